// AdamW with gradient clipping as one pass over the parameters, called through XLA's FFI
// (jbt/train/fused_update.py). Per element it computes what optax.chain(jbt's
// clip_by_global_norm, optax.adamw) computes, in the same float32 operations in the same order
// (built with -ffp-contract=off: a multiply and an add are fused only where written as std::fma,
// where XLA's CPU code fuses them): the new parameter, first and second moments in place, and the sums of squares of the updates and of the new parameters (the logged
// norms), which XLA would otherwise compute in passes of their own. Sums are per fixed chunk of
// a leaf and added in chunk order, so they are the same bits for any number of threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

#include "jbt_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 1 << 15;

// The scalars, in the order fused_update.py packs them.
struct Hyper {
  float scale;         // gradient clipping factor (1 without clipping)
  float one_minus_b1;  // (1 - b1), as optax multiplies it
  float b1;
  float one_minus_b2;
  float b2;
  float inv_bias1;     // 1 / (1 - b1 ** count): XLA divides by a broadcast scalar as a multiply by its reciprocal
  float inv_bias2;     // 1 / (1 - b2 ** count)
  float eps_root;
  float eps;
  float weight_decay;
  float step;          // -learning rate
};
constexpr int64_t kHyper = sizeof(Hyper) / sizeof(float);

struct Leaf {
  const float* p;
  const float* g;
  const float* m;
  const float* v;
  float* p_out;
  float* m_out;
  float* v_out;
  int64_t n;
};

struct Chunk {
  int leaf;
  int64_t lo, hi;
};

constexpr int kLanes = 16;

// One element; returns the update (the new parameter is p + u).
inline float element(const Hyper& h, const Leaf& L, int64_t i, float* p_new) {
  // XLA's CPU code fuses a multiply into the add that takes it (its first operand's where both are
  // products): the same fused multiply-adds here.
  const float g = L.g[i] * h.scale;
  const float m = std::fma(g, h.one_minus_b1, h.b1 * L.m[i]);
  const float v = std::fma(g * g, h.one_minus_b2, h.b2 * L.v[i]);
  const float m_hat = m * h.inv_bias1;
  const float v_hat = v * h.inv_bias2;
  float u = m_hat / (std::sqrt(v_hat + h.eps_root) + h.eps);
  const float p = L.p[i];
  u = std::fma(h.weight_decay, p, u);
  u = h.step * u;
  *p_new = p + u;
  L.p_out[i] = *p_new;
  L.m_out[i] = m;
  L.v_out[i] = v;
  return u;
}

// Elements [lo, hi) of a leaf, kLanes at a time (vector code: each lane keeps its own sums).
void run_chunk(const Hyper& h, const Leaf& L, int64_t lo, int64_t hi, double* sums) {
  double uu[kLanes] = {}, pp[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
#pragma GCC ivdep
    for (int j = 0; j < kLanes; ++j) {
      float p_new;
      const float u = element(h, L, i + j, &p_new);
      uu[j] += double(u) * double(u);
      pp[j] += double(p_new) * double(p_new);
    }
  }
  for (int j = 0; i < hi; ++i, ++j) {
    float p_new;
    const float u = element(h, L, i, &p_new);
    uu[j] += double(u) * double(u);
    pp[j] += double(p_new) * double(p_new);
  }
  sums[0] = sums[1] = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    sums[0] += uu[j];
    sums[1] += pp[j];
  }
}

ffi::Error AdamW(ffi::Buffer<ffi::F32> hyper, ffi::RemainingArgs args, ffi::Result<ffi::Buffer<ffi::F32>> sums_out,
                 ffi::RemainingRets rets) {
  if (hyper.element_count() != kHyper)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fused AdamW: wrong number of scalars");
  if (args.size() % 4 != 0 || rets.size() * 4 != args.size() * 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fused AdamW: expected (p, g, m, v) in and (p, m, v) out per leaf");
  Hyper h;
  const float* hp = hyper.typed_data();
  float* hf = reinterpret_cast<float*>(&h);
  for (int64_t i = 0; i < kHyper; ++i) hf[i] = hp[i];

  const size_t n_leaves = args.size() / 4;
  std::vector<Leaf> leaves(n_leaves);
  for (size_t l = 0; l < n_leaves; ++l) {
    const float* in[4];
    int64_t sizes[4];
    for (int j = 0; j < 4; ++j) {
      auto a = args.get<ffi::AnyBuffer>(4 * l + j);
      if (!a.has_value() || a->element_type() != ffi::DataType::F32)
        return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fused AdamW: inputs must be float32 buffers");
      in[j] = reinterpret_cast<const float*>(a->untyped_data());
      sizes[j] = int64_t(a->element_count());
    }
    float* out[3];
    for (int j = 0; j < 3; ++j) {
      auto r = rets.get<ffi::AnyBuffer>(3 * l + j);
      if (!r.has_value() || (*r)->element_type() != ffi::DataType::F32)
        return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fused AdamW: outputs must be float32 buffers");
      out[j] = reinterpret_cast<float*>((*r)->untyped_data());
    }
    for (int j = 1; j < 4; ++j)
      if (sizes[j] != sizes[0])
        return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fused AdamW: a leaf's p, g, m and v differ in size");
    leaves[l] = Leaf{in[0], in[1], in[2], in[3], out[0], out[1], out[2], sizes[0]};
  }

  std::vector<Chunk> chunks;
  for (size_t l = 0; l < n_leaves; ++l)
    for (int64_t lo = 0; lo < leaves[l].n; lo += kChunk)
      chunks.push_back(Chunk{int(l), lo, std::min(leaves[l].n, lo + kChunk)});
  std::vector<double> sums(2 * chunks.size(), 0.0);

  std::atomic<size_t> next{0};
  auto work = [&]() {
    for (size_t c; (c = next.fetch_add(1)) < chunks.size();)
      run_chunk(h, leaves[chunks[c].leaf], chunks[c].lo, chunks[c].hi, &sums[2 * c]);
  };
  const int n_threads = std::max(1, std::min<int>(jbt::num_threads(), int(chunks.size())));
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();

  double uu = 0.0, pp = 0.0;  // in chunk order: the same bits for any thread count
  for (size_t c = 0; c < chunks.size(); ++c) {
    uu += sums[2 * c];
    pp += sums[2 * c + 1];
  }
  sums_out->typed_data()[0] = float(uu);
  sums_out->typed_data()[1] = float(pp);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());
