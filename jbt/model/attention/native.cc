// Block-sparse causal attention for packed rows as one compiled CPU kernel (jbt.model.attention.native).
//
// The same mask and online softmax as flash.py, but each (row, query block) is one task of a
// thread pool and a visited block's work (two or five block matmuls, the softmax, the mask) is
// vector code over float32 tiles, so both cores work inside the block loop and no per-op
// overhead is paid per visit. Built by native.py at first use with the host's own instruction
// set (-march=native) and called through XLA's FFI.
//
// Shapes: q [B, L, K, G, H], k and v [B, L, K, H] (bfloat16 or float32), segment, branch and
// position ids [B, L] int32, window [] int32 (a layer's window, 0 = none). out like q, lse
// [B, L, K, G] float32. H must be a multiple of 16.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int T = 64;        // tokens a block
constexpr float NEG = -1e30f;  // masked scores' running max start

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

inline v16 splat(float x) { return v16{} + x; }
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
inline v16 vmin(v16 a, v16 b) { return a < b ? a : b; }
inline float hmax(v16 v) { float m = v[0]; for (int i = 1; i < 16; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(v16 v) { float s = 0; for (int i = 0; i < 16; ++i) s += v[i]; return s; }

// exp(x) for x <= 88 (float32 relative error ~2e-7); 0 below -87.
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.0f);
  v16 xc = vmax(vmin(x, splat(88.0f)), lo);
  v16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  v16 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  i16v e = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &e, sizeof scale);
  v16 y = p * scale;
  return x < lo ? splat(0.0f) : y;
}

inline float bf16_to_f32(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// A float32 or bfloat16 array read and written as float32.
struct Elems {
  void* data;
  bool bf16;
  float get(size_t i) const { return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(data)[i]) : static_cast<const float*>(data)[i]; }
  void set(size_t i, float x) const {
    if (bf16) static_cast<uint16_t*>(data)[i] = f32_to_bf16(x); else static_cast<float*>(data)[i] = x;
  }
};

// C[M x N] (+)= A B, A(m, k) = A[m * sm + k * sk], B row-major [Kd x N] (ldb), C row-major (ldc).
// N a multiple of 16: rows in fours, columns in chunks of 4 vectors, all accumulators in registers.
template <int MR, int NV, bool ACC>
inline void gemm_tile(int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  v16 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? load(C + r * ldc + 16 * v) : splat(0.0f);
  for (int k = 0; k < Kd; ++k) {
    v16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      v16 a = splat(A[r * sm + k * sk]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + 16 * v, acc[r][v]);
}

template <int NV, bool ACC>
inline void gemm_cols(int M, int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) gemm_tile<4, NV, ACC>(Kd, A + m * sm, sm, sk, B, ldb, C + m * ldc, ldc);
  for (; m < M; ++m) gemm_tile<1, NV, ACC>(Kd, A + m * sm, sm, sk, B, ldb, C + m * ldc, ldc);
}

template <bool ACC>
void gemm(int M, int N, int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  for (int n = 0; n < N; n += 64) {
    switch (std::min(64, N - n) / 16) {
      case 4: gemm_cols<4, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
      case 3: gemm_cols<3, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
      case 2: gemm_cols<2, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
      default: gemm_cols<1, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
    }
  }
}

int num_threads() {
  if (const char* s = std::getenv("JBT_NATIVE_THREADS")) {
    int n = std::atoi(s);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs fn(task, worker) for every task in [0, n) on up to num_threads() threads (worker < that).
void parallel_for(int n, const std::function<void(int, int)>& fn) {
  int workers = std::min(n, num_threads());
  std::atomic<int> next{0};
  auto run = [&](int w) {
    for (int t; (t = next.fetch_add(1)) < n;) fn(t, w);
  };
  std::vector<std::thread> threads;
  for (int w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& t : threads) t.join();
}

struct Problem {
  int B, L, K, G, H, NB;
  float scale, softcap;
  long window;  // 0: none
  const int32_t *seg, *br, *pos;  // br, pos may be null
  std::vector<int> first_block;  // [B * NB]: the first key block a query block can see

  Problem(int B_, int L_, int K_, int G_, int H_, const int32_t* seg_, const int32_t* br_, const int32_t* pos_,
          long window_, float scale_, float softcap_)
      : B(B_), L(L_), K(K_), G(G_), H(H_), NB((L_ + T - 1) / T), scale(scale_),
        softcap(softcap_), window(window_), seg(seg_), br(br_), pos(pos_), first_block(size_t(B_) * NB) {
    // A token's earliest key is its segment's start (segments are contiguous runs; padding sees
    // itself only); a query block's is its first token's, as starts never decrease along a row.
    for (int b = 0; b < B; ++b) {
      const int32_t* s = seg + size_t(b) * L;
      int start = 0;
      for (int t = 0; t < L; ++t) {
        if (t == 0 || s[t] != s[t - 1] || s[t] == 0) start = t;
        if (t % T == 0) first_block[size_t(b) * NB + t / T] = start / T;
      }
    }
  }

  // mask[T x T] (1 where query q0 + t sees key k0 + c); false if nothing in the block is seen.
  bool block_mask(int b, int q0, int k0, float* mask) const {
    const int32_t* s = seg + size_t(b) * L;
    const int32_t* r = br ? br + size_t(b) * L : nullptr;
    const int32_t* p = pos ? pos + size_t(b) * L : nullptr;
    bool any = false;
    for (int t = 0; t < T; ++t) {
      int qi = q0 + t;
      for (int c = 0; c < T; ++c) {
        int kj = k0 + c;
        bool ok = qi < L && kj < L && kj <= qi && s[qi] == s[kj] && (s[qi] != 0 || qi == kj);
        if (ok && r) ok = r[kj] == 0 || r[kj] == r[qi];
        if (ok && p && window > 0) ok = long(p[qi]) - long(p[kj]) < window;
        mask[t * T + c] = ok ? 1.0f : 0.0f;
        any |= ok;
      }
    }
    return any;
  }

  size_t q_index(int b, int t, int k, int g) const { return (((size_t(b) * L + t) * K + k) * G + g) * H; }
  size_t kv_index(int b, int t, int k) const { return ((size_t(b) * L + t) * K + k) * H; }
  int rows() const { return G * T; }
};

// Key and value blocks as float32 tiles, [B, K, NB] of [T x H] (natural) or [H x T] (transposed),
// zero past the row's end.
std::vector<float> key_tiles(const Problem& P, const Elems& x, bool transposed) {
  std::vector<float> out(size_t(P.B) * P.K * P.NB * T * P.H, 0.0f);
  parallel_for(P.B * P.K, [&](int task, int) {
    int b = task / P.K, k = task % P.K;
    for (int t = 0; t < P.L; ++t) {
      float* tile = out.data() + ((size_t(b) * P.K + k) * P.NB + t / T) * T * P.H;
      size_t src = P.kv_index(b, t, k);
      for (int h = 0; h < P.H; ++h) tile[transposed ? h * T + t % T : (t % T) * P.H + h] = x.get(src + h);
    }
  });
  return out;
}

const float* tile(const std::vector<float>& tiles, const Problem& P, int b, int k, int j) {
  return tiles.data() + ((size_t(b) * P.K + k) * P.NB + j) * T * P.H;
}

// Scores of rows R of one kv head against key block j: S = softcap(Q kT * scale); with the mask
// as 0/1 per (t, c), shared by the G groups (row r = g * T + t).
void scores(const Problem& P, const float* Q, const float* kT, float* S) {
  int R = P.rows();
  gemm<false>(R, T, P.H, Q, P.H, 1, kT, T, S, T);
  v16 sc = splat(P.scale);
  for (int i = 0; i < R * T; i += 16) {
    v16 s = load(S + i) * sc;
    if (P.softcap > 0) {
      for (int e = 0; e < 16; ++e) s[e] = P.softcap * std::tanh(s[e] / P.softcap);
    }
    store(S + i, s);
  }
}

void load_rows(const Problem& P, const Elems& x, int b, int i, int k, float* rows) {
  int q0 = i * T;
  for (int g = 0; g < P.G; ++g)
    for (int t = 0; t < T; ++t) {
      float* dst = rows + (size_t(g) * T + t) * P.H;
      if (q0 + t < P.L) {
        size_t src = P.q_index(b, q0 + t, k, g);
        for (int h = 0; h < P.H; ++h) dst[h] = x.get(src + h);
      } else {
        std::fill(dst, dst + P.H, 0.0f);
      }
    }
}

void forward(const Problem& P, const Elems& q, const Elems& kx, const Elems& vx, const Elems& out, float* lse) {
  std::vector<float> kT = key_tiles(P, kx, true), v = key_tiles(P, vx, false);
  int R = P.rows(), H = P.H, K = P.K;
  parallel_for(P.B * P.NB, [&](int task, int) {
    int b = task / P.NB, i = P.NB - 1 - task % P.NB;  // the longest key ranges first
    thread_local std::vector<float> Q, S, M, Lsum, acc, mask;
    Q.resize(size_t(K) * R * H); acc.assign(size_t(K) * R * H, 0.0f);
    M.assign(size_t(K) * R, NEG); Lsum.assign(size_t(K) * R, 0.0f);
    S.resize(size_t(R) * T); mask.resize(T * T);
    for (int k = 0; k < K; ++k) load_rows(P, q, b, i, k, Q.data() + size_t(k) * R * H);
    for (int j = P.first_block[size_t(b) * P.NB + i]; j <= i; ++j) {
      if (!P.block_mask(b, i * T, j * T, mask.data())) continue;
      for (int k = 0; k < K; ++k) {
        scores(P, Q.data() + size_t(k) * R * H, tile(kT, P, b, k, j), S.data());
        float *m = M.data() + size_t(k) * R, *l = Lsum.data() + size_t(k) * R, *a = acc.data() + size_t(k) * R * H;
        for (int r = 0; r < R; ++r) {
          float* s = S.data() + size_t(r) * T;
          const float* mk = mask.data() + (r % T) * T;
          v16 mx = splat(NEG);
          for (int c = 0; c < T; c += 16) mx = vmax(mx, load(mk + c) > 0.0f ? load(s + c) : splat(NEG));
          float m_new = std::max(m[r], hmax(mx));
          v16 sum = splat(0.0f);
          for (int c = 0; c < T; c += 16) {
            v16 p = load(mk + c) > 0.0f ? vexp(load(s + c) - m_new) : splat(0.0f);
            store(s + c, p);
            sum += p;
          }
          float corr = std::exp(m[r] - m_new);
          l[r] = l[r] * corr + hsum(sum);
          m[r] = m_new;
          if (corr != 1.0f) {
            v16 cv = splat(corr);
            for (int h = 0; h < H; h += 16) store(a + size_t(r) * H + h, load(a + size_t(r) * H + h) * cv);
          }
        }
        gemm<true>(R, H, T, S.data(), T, 1, tile(v, P, b, k, j), H, a, H);
      }
    }
    for (int k = 0; k < K; ++k)
      for (int g = 0; g < P.G; ++g)
        for (int t = 0; t < T && i * T + t < P.L; ++t) {
          int r = g * T + t;
          float l = Lsum[size_t(k) * R + r], inv = 1.0f / l;
          const float* a = acc.data() + (size_t(k) * R + r) * H;
          size_t dst = P.q_index(b, i * T + t, k, g);
          for (int h = 0; h < H; ++h) out.set(dst + h, a[h] * inv);
          lse[((size_t(b) * P.L + i * T + t) * K + k) * P.G + g] = M[size_t(k) * R + r] + std::log(l);
        }
  });
}

void backward(const Problem& P, const Elems& q, const Elems& kx, const Elems& vx, const Elems& out,
              const float* lse, const Elems& dout, const Elems& dq, const Elems& dk, const Elems& dv) {
  std::vector<float> kT = key_tiles(P, kx, true), kN = key_tiles(P, kx, false);
  std::vector<float> vT = key_tiles(P, vx, true);
  int R = P.rows(), H = P.H, K = P.K;
  size_t tiles = size_t(P.B) * K * P.NB * T * H;
  int workers = std::min(P.B * P.NB, num_threads());
  // Each worker adds its key blocks' gradients into its own buffers, summed at the end.
  std::vector<std::vector<float>> dkw(workers), dvw(workers);
  parallel_for(P.B * P.NB, [&](int task, int w) {
    int b = task / P.NB, i = P.NB - 1 - task % P.NB;
    if (dkw[w].empty()) { dkw[w].assign(tiles, 0.0f); dvw[w].assign(tiles, 0.0f); }
    thread_local std::vector<float> Q, dO, S, dP, mask, lse_r, d_r, dQ, O;
    Q.resize(size_t(K) * R * H); dO.resize(size_t(K) * R * H); O.resize(size_t(R) * H);
    dQ.assign(size_t(K) * R * H, 0.0f); lse_r.resize(size_t(K) * R); d_r.resize(size_t(K) * R);
    S.resize(size_t(R) * T); dP.resize(size_t(R) * T); mask.resize(T * T);
    for (int k = 0; k < K; ++k) {
      float *Qk = Q.data() + size_t(k) * R * H, *dOk = dO.data() + size_t(k) * R * H;
      load_rows(P, q, b, i, k, Qk);
      load_rows(P, dout, b, i, k, dOk);
      load_rows(P, out, b, i, k, O.data());
      for (int r = 0; r < R; ++r) {
        int g = r / T, t = i * T + r % T;
        float d = 0;
        for (int h = 0; h < H; ++h) d += dOk[size_t(r) * H + h] * O[size_t(r) * H + h];
        d_r[size_t(k) * R + r] = d;
        lse_r[size_t(k) * R + r] = t < P.L ? lse[((size_t(b) * P.L + t) * K + k) * P.G + g] : 0.0f;
      }
    }
    for (int j = P.first_block[size_t(b) * P.NB + i]; j <= i; ++j) {
      if (!P.block_mask(b, i * T, j * T, mask.data())) continue;
      for (int k = 0; k < K; ++k) {
        const float *Qk = Q.data() + size_t(k) * R * H, *dOk = dO.data() + size_t(k) * R * H;
        scores(P, Qk, tile(kT, P, b, k, j), S.data());
        gemm<false>(R, T, H, dOk, H, 1, tile(vT, P, b, k, j), T, dP.data(), T);
        for (int r = 0; r < R; ++r) {
          float *s = S.data() + size_t(r) * T, *dp = dP.data() + size_t(r) * T;
          const float* mk = mask.data() + (r % T) * T;
          v16 l = splat(lse_r[size_t(k) * R + r]), d = splat(d_r[size_t(k) * R + r]), sc = splat(P.scale);
          for (int c = 0; c < T; c += 16) {
            v16 sv = load(s + c);
            v16 p = load(mk + c) > 0.0f ? vexp(sv - l) : splat(0.0f);
            v16 ds = p * (load(dp + c) - d) * sc;
            if (P.softcap > 0) ds *= 1.0f - (sv / P.softcap) * (sv / P.softcap);
            store(s + c, p);
            store(dp + c, ds);
          }
        }
        size_t at = ((size_t(b) * K + k) * P.NB + j) * T * H;
        gemm<true>(T, H, R, S.data(), 1, T, dOk, H, dvw[w].data() + at, H);       // dV += P^T dO
        gemm<true>(R, H, T, dP.data(), T, 1, tile(kN, P, b, k, j), H, dQ.data() + size_t(k) * R * H, H);  // dQ += dS K
        gemm<true>(T, H, R, dP.data(), 1, T, Qk, H, dkw[w].data() + at, H);       // dK += dS^T Q
      }
    }
    for (int k = 0; k < K; ++k)
      for (int g = 0; g < P.G; ++g)
        for (int t = 0; t < T && i * T + t < P.L; ++t) {
          const float* src = dQ.data() + (size_t(k) * R + g * T + t) * H;
          size_t dst = P.q_index(b, i * T + t, k, g);
          for (int h = 0; h < H; ++h) dq.set(dst + h, src[h]);
        }
  });
  parallel_for(P.B * K, [&](int task, int) {
    int b = task / K, k = task % K;
    for (int t = 0; t < P.L; ++t) {
      size_t at = ((size_t(b) * K + k) * P.NB + t / T) * T * H + size_t(t % T) * H, dst = P.kv_index(b, t, k);
      for (int h = 0; h < H; ++h) {
        float sk = 0, sv = 0;
        for (auto& x : dkw) if (!x.empty()) sk += x[at + h];
        for (auto& x : dvw) if (!x.empty()) sv += x[at + h];
        dk.set(dst + h, sk);
        dv.set(dst + h, sv);
      }
    }
  });
}

Elems elems(ffi::AnyBuffer x) { return {x.untyped_data(), x.element_type() == ffi::DataType::BF16}; }
Elems elems(ffi::Result<ffi::AnyBuffer> x) { return {x->untyped_data(), x->element_type() == ffi::DataType::BF16}; }

ffi::Error check(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v) {
  for (auto* x : {&q, &k, &v}) {
    auto t = x->element_type();
    if (t != ffi::DataType::BF16 && t != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("native attention takes bfloat16 or float32 q, k, v");
  }
  if (q.dimensions().size() != 5 || k.dimensions().size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("native attention: q [B, L, K, G, H], k and v [B, L, K, H]");
  if (q.dimensions()[4] % 16 != 0)
    return ffi::Error::InvalidArgument("native attention: the head dim must be a multiple of 16");
  return ffi::Error::Success();
}

Problem problem(ffi::AnyBuffer q, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> pos,
                ffi::Buffer<ffi::S32> window, int64_t sliding_window, bool has_branches, float scale, float softcap) {
  auto d = q.dimensions();
  long w = window.typed_data()[0];
  long win = sliding_window > 0 ? (w > 0 ? std::min<long>(w, sliding_window) : sliding_window) : (w > 0 ? w : 0);
  return Problem(int(d[0]), int(d[1]), int(d[2]), int(d[3]), int(d[4]), seg.typed_data(),
                 has_branches ? br.typed_data() : nullptr, win > 0 ? pos.typed_data() : nullptr, win, scale, softcap);
}

ffi::Error ForwardImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> seg,
                       ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> window,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                       int64_t sliding_window, bool has_branches, float scale, float softcap) {
  if (auto e = check(q, k, v); e.failure()) return e;
  Problem P = problem(q, seg, br, pos, window, sliding_window, has_branches, scale, softcap);
  forward(P, elems(q), elems(k), elems(v), elems(out), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> seg,
                        ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> window,
                        ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout,
                        ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                        int64_t sliding_window, bool has_branches, float scale, float softcap) {
  if (auto e = check(q, k, v); e.failure()) return e;
  Problem P = problem(q, seg, br, pos, window, sliding_window, has_branches, scale, softcap);
  backward(P, elems(q), elems(k), elems(v), elems(out), lse.typed_data(), elems(dout), elems(dq), elems(dk),
           elems(dv));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<bool>("has_branches")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<bool>("has_branches")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
