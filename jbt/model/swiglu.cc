// The gated MLP's activation, h = silu(g) * u, and its gradient as XLA FFI calls on a CPU
// (jbt/model/swiglu.py). XLA's CPU code runs this elementwise work as several single-threaded
// passes over [tokens, F] arrays (the sigmoid, the product and its rounding; in the backward pass
// the sigmoid again, h for the down projection's weight gradient, dg and du); here each is one
// vector pass split over up to JBT_NATIVE_THREADS threads.
//
// bfloat16 g, u, dh (any shape, one layout); float32 inside, each result rounded to bfloat16 once,
// the same operations as JAX's silu and its autodiff: s = 1 / (1 + exp(-g)), h = (g s) u;
// du = dh (g s), dg = (dh u) s + ((dh u) g) (s (1 - s)).
//
// The backward kernel with h transposed (jbt_swiglu_bwd_t, [T, F] -> hT [F, T]) serves the gated
// MLP whose down projection's weight gradient hT dy it feeds: h is then neither kept nor recomputed
// and transposed in passes of its own.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "jbt_threads.h"
#include "jbt_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jbt;

inline vf sigmoid(vf g) { return 1.0f / (1.0f + vexp(-g)); }

// h, dg and du of kLanes elements (g = x, u = y, dh = d), in JAX's operations and order.
struct Grads {
  vf h, dg, du;
};
inline Grads grads(vf x, vf y, vf d) {
  vf s = sigmoid(x), gs = x * s, ds = d * y;
  return {gs * y, ds * s + (ds * x) * (s * (1.0f - s)), d * gs};
}

void forward(const uint16_t* g, const uint16_t* u, uint16_t* h, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += kLanes) {
    vf x = load_bf16(g + i);
    store_bf16(h + i, (x * sigmoid(x)) * load_bf16(u + i));
  }
}

void backward(const uint16_t* g, const uint16_t* u, const uint16_t* dh, uint16_t* dg, uint16_t* du, int64_t i0,
              int64_t i1) {
  for (int64_t i = i0; i < i1; i += kLanes) {
    Grads r = grads(load_bf16(g + i), load_bf16(u + i), load_bf16(dh + i));
    store_bf16(du + i, r.du);
    store_bf16(dg + i, r.dg);
  }
}

// Rows [r0, r1) of [T, F] g, u, dh: dg, du as above and h written transposed (hT [F, T]), in
// tiles of kLanes rows x kLanes columns; columns past the last whole vector and rows past
// r1 - (r1 - r0) % kLanes one at a time.
void backward_t(const uint16_t* g, const uint16_t* u, const uint16_t* dh, uint16_t* dg, uint16_t* du, uint16_t* hT,
                int64_t T, int64_t F, int64_t r0, int64_t r1) {
  alignas(64) float tile[kLanes][kLanes];
  const int64_t Fv = F / kLanes * kLanes;
  int64_t r = r0;
  for (; r + kLanes <= r1; r += kLanes) {
    for (int64_t c = 0; c < Fv; c += kLanes) {
      for (int i = 0; i < kLanes; ++i) {
        const int64_t at = (r + i) * F + c;
        Grads q = grads(load_bf16(g + at), load_bf16(u + at), load_bf16(dh + at));
        store_bf16(du + at, q.du);
        store_bf16(dg + at, q.dg);
        store(tile[i], q.h);
      }
      for (int j = 0; j < kLanes; ++j) {
        vf col;
        for (int i = 0; i < kLanes; ++i) col[i] = tile[i][j];
        store_bf16(hT + (c + j) * T + r, col);
      }
    }
  }
  for (int64_t i = r; i < r1; ++i)  // the rows left, and below the columns left
    for (int64_t c = 0; c < Fv; c += kLanes) {
      const int64_t at = i * F + c;
      Grads q = grads(load_bf16(g + at), load_bf16(u + at), load_bf16(dh + at));
      store_bf16(du + at, q.du);
      store_bf16(dg + at, q.dg);
      alignas(64) uint16_t h[kLanes];
      store_bf16(h, q.h);
      for (int j = 0; j < kLanes; ++j) hT[(c + j) * T + i] = h[j];
    }
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t c = Fv; c < F; ++c) {
      const int64_t at = i * F + c;
      Grads q = grads(splat(bf16_to_f32(g[at])), splat(bf16_to_f32(u[at])), splat(bf16_to_f32(dh[at])));
      du[at] = f32_to_bf16(q.du[0]);
      dg[at] = f32_to_bf16(q.dg[0]);
      hT[c * T + i] = f32_to_bf16(q.h[0]);
    }
}

// fn(i0, i1) over [0, n) in whole vectors, split over the threads; the last < kLanes elements
// through a padded copy (fn on [0, kLanes) of copies the caller makes).
template <typename F>
void parallel(int64_t n, const F& fn) {
  const int64_t vecs = n / kLanes;
  jbt::split(vecs, std::min<int64_t>(jbt::num_threads(), vecs / 4096 + 1),
             [&](int64_t v0, int64_t v1) { fn(v0 * kLanes, v1 * kLanes); });
}

ffi::Error check(std::initializer_list<const ffi::AnyBuffer*> xs) {
  const ffi::AnyBuffer* first = *xs.begin();
  for (const ffi::AnyBuffer* x : xs) {
    if (x->element_type() != ffi::DataType::BF16)
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "swiglu: bfloat16 arrays only");
    if (x->element_count() != first->element_count())
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "swiglu: the arrays differ in size");
  }
  return ffi::Error::Success();
}

const uint16_t* in(const ffi::AnyBuffer& x) { return static_cast<const uint16_t*>(x.untyped_data()); }
uint16_t* out(ffi::Result<ffi::AnyBuffer>& x) { return static_cast<uint16_t*>(x->untyped_data()); }

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer u, ffi::Result<ffi::AnyBuffer> h) {
  if (auto e = check({&g, &u}); e.failure()) return e;
  jbt::PoolScope<ffi::ThreadPool> scope(pool);
  const int64_t n = int64_t(g.element_count()), body = n / kLanes * kLanes;
  const uint16_t *pg = in(g), *pu = in(u);
  uint16_t* ph = out(h);
  parallel(n, [&](int64_t i0, int64_t i1) { forward(pg, pu, ph, i0, i1); });
  if (body < n) {
    uint16_t tg[kLanes] = {}, tu[kLanes] = {}, th[kLanes];
    std::copy(pg + body, pg + n, tg);
    std::copy(pu + body, pu + n, tu);
    forward(tg, tu, th, 0, kLanes);
    std::copy(th, th + (n - body), ph + body);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer u, ffi::AnyBuffer dh, ffi::Result<ffi::AnyBuffer> dg,
                    ffi::Result<ffi::AnyBuffer> du) {
  if (auto e = check({&g, &u, &dh}); e.failure()) return e;
  jbt::PoolScope<ffi::ThreadPool> scope(pool);
  const int64_t n = int64_t(g.element_count()), body = n / kLanes * kLanes;
  const uint16_t *pg = in(g), *pu = in(u), *pd = in(dh);
  uint16_t *pdg = out(dg), *pdu = out(du);
  parallel(n, [&](int64_t i0, int64_t i1) { backward(pg, pu, pd, pdg, pdu, i0, i1); });
  if (body < n) {
    uint16_t tg[kLanes] = {}, tu[kLanes] = {}, td[kLanes] = {}, tdg[kLanes], tdu[kLanes];
    std::copy(pg + body, pg + n, tg);
    std::copy(pu + body, pu + n, tu);
    std::copy(pd + body, pd + n, td);
    backward(tg, tu, td, tdg, tdu, 0, kLanes);
    std::copy(tdg, tdg + (n - body), pdg + body);
    std::copy(tdu, tdu + (n - body), pdu + body);
  }
  return ffi::Error::Success();
}

ffi::Error BackwardT(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer u, ffi::AnyBuffer dh, ffi::Result<ffi::AnyBuffer> dg,
                     ffi::Result<ffi::AnyBuffer> du, ffi::Result<ffi::AnyBuffer> hT) {
  if (auto e = check({&g, &u, &dh}); e.failure()) return e;
  jbt::PoolScope<ffi::ThreadPool> scope(pool);
  auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "swiglu: [tokens, F] arrays only");
  const int64_t T = dims[0], F = dims[1];
  const uint16_t *pg = in(g), *pu = in(u), *pd = in(dh);
  uint16_t *pdg = out(dg), *pdu = out(du), *ph = out(hT);
  const int64_t blocks = T / kLanes;  // whole kLanes-row blocks split over the threads; the last takes the rest
  jbt::split(blocks, std::min<int64_t>(jbt::num_threads(), T * F / 65536 + 1), [&](int64_t b0, int64_t b1) {
    backward_t(pg, pu, pd, pdg, pdu, ph, T, F, b0 * kLanes, b1 == blocks ? T : b1 * kLanes);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtSwigluBwdT, BackwardT,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtSwigluFwd, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtSwigluBwd, Backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
