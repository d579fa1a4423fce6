// Block-sparse causal attention for packed rows as one compiled CPU kernel (jbt.model.attention.native).
//
// The same mask and online softmax as flash.py, but each (row, query block) is one task for one of
// the process's CPUs and a visited block's work (two or five block matmuls, the softmax, the mask)
// is vector code: AMX tile matmuls for bfloat16 inputs where the CPU has AMX, float32 tiles
// elsewhere. Every core works inside the block loop and no per-op overhead is paid per visit.
// Built by native.py at first use with the host's own instruction set (-march=native) and called
// through XLA's FFI.
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

#include "jbt_threads.h"
#include "jbt_vec.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define JBT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

using namespace jbt;

constexpr int T = 64;        // tokens a block
constexpr float NEG = -1e30f;  // masked scores' running max start

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Two rows' vectors as pairs (row0[c], row1[c]): the layout AMX reads a matmul's right operand in.
inline void store_pairs(uint16_t* p, vf x0, vf x1) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512i both = (__m512i)_mm512_cvtne2ps_pbh(__m512(x1), __m512(x0));  // x0's in the low half
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, both));
}
#else
// Two rows' vectors as pairs (row0[c], row1[c]): the layout AMX reads a matmul's right operand in.
inline void store_pairs(uint16_t* p, vf x0, vf x1) {
  vu w = (rounded_bits(x0) >> 16) | (rounded_bits(x1) & 0xffff0000u);
  std::memcpy(p, &w, sizeof w);
}
#endif

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
// N a multiple of 4 vectors' width: rows in fours, columns in chunks of 4 vectors, all accumulators in
// registers.
template <int MR, int NV, bool ACC>
inline void gemm_tile(int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? load(C + r * ldc + kLanes * v) : splat(0.0f);
  for (int k = 0; k < Kd; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + kLanes * v);
    for (int r = 0; r < MR; ++r) {
      vf a = splat(A[r * sm + k * sk]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + kLanes * v, acc[r][v]);
}

template <int NV, bool ACC>
inline void gemm_cols(int M, int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) gemm_tile<4, NV, ACC>(Kd, A + m * sm, sm, sk, B, ldb, C + m * ldc, ldc);
  for (; m < M; ++m) gemm_tile<1, NV, ACC>(Kd, A + m * sm, sm, sk, B, ldb, C + m * ldc, ldc);
}

#ifdef __AVX512F__
// 32 vector registers of 16 floats: 4 rows x up to 4 vectors of accumulators.
template <bool ACC>
void gemm(int M, int N, int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  for (int n = 0; n < N; n += 4 * kLanes) {
    switch (std::min(4 * kLanes, N - n) / kLanes) {
      case 4: gemm_cols<4, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
      case 3: gemm_cols<3, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
      case 2: gemm_cols<2, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
      default: gemm_cols<1, ACC>(M, Kd, A, sm, sk, B + n, ldb, C + n, ldc); break;
    }
  }
}
#else
// 16 vector registers of 8 floats (AVX2): tiles of 6 rows x 16 columns in 8-float vectors (12
// accumulators, 2 B vectors, the broadcast A element), multiply-adds fused where the CPU has FMA.

template <int MR, bool ACC>
inline void gemm_tile_avx2(int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  static_assert(kLanes == 8, "AVX2's 8-float vectors");
  vf acc[MR][2];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) acc[r][v] = ACC ? load(C + r * ldc + kLanes * v) : splat(0.0f);
  for (int k = 0; k < Kd; ++k) {
    vf b[2] = {load(B + k * ldb), load(B + k * ldb + kLanes)};
    for (int r = 0; r < MR; ++r) {
      vf a = splat(A[r * sm + k * sk]);
#ifdef __FMA__
      acc[r][0] = (vf)_mm256_fmadd_ps((__m256)a, (__m256)b[0], (__m256)acc[r][0]);
      acc[r][1] = (vf)_mm256_fmadd_ps((__m256)a, (__m256)b[1], (__m256)acc[r][1]);
#else
      acc[r][0] += a * b[0];
      acc[r][1] += a * b[1];
#endif
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) store(C + r * ldc + kLanes * v, acc[r][v]);
}

template <bool ACC>
void gemm(int M, int N, int Kd, const float* A, long sm, long sk, const float* B, long ldb, float* C, long ldc) {
  for (int n = 0; n < N; n += 2 * kLanes) {
    int m = 0;
    for (; m + 6 <= M; m += 6) gemm_tile_avx2<6, ACC>(Kd, A + m * sm, sm, sk, B + n, ldb, C + m * ldc + n, ldc);
    if (m + 4 <= M) gemm_tile_avx2<4, ACC>(Kd, A + m * sm, sm, sk, B + n, ldb, C + m * ldc + n, ldc), m += 4;  // 64 = 10 x 6 + 4
    if (m + 2 <= M) gemm_tile_avx2<2, ACC>(Kd, A + m * sm, sm, sk, B + n, ldb, C + m * ldc + n, ldc), m += 2;
    for (; m < M; ++m) gemm_tile_avx2<1, ACC>(Kd, A + m * sm, sm, sk, B + n, ldb, C + m * ldc + n, ldc);
  }
}
#endif

#ifdef JBT_AMX
// Intel AMX: bfloat16 tile matmuls (16 x 16 float32 accumulators, 16 x 32 bfloat16 operands).
bool amx_usable() {
  if (std::getenv("JBT_NATIVE_NO_AMX")) return false;
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr TileConfig tile_config() {
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 8; ++i) c.rows[i] = 16, c.colsb[i] = 64;
  return c;
}
// Every tile 16 rows of 64 bytes. A constant in memory: GCC does not see ldtilecfg read a local's
// stores and drops them.
alignas(64) constexpr TileConfig TILES = tile_config();

// Per thread, so each task sets it (and releases the tiles after).
void amx_config() { _tile_loadconfig(&TILES); }

// C[M x N] (+)= A[M x Kd] B: A bfloat16 row-major (lda), B as pairs of its rows (store_pairs:
// Bp[(k / 2) * 2N + 2n + k % 2] = B[k][n]), C float32 (ldc). M, N and Kd multiples of 32.
template <bool ACC>
void amx_gemm(int M, int N, int Kd, const uint16_t* A, long lda, const uint16_t* Bp, float* C, long ldc) {
  const long cs = ldc * 4, as = lda * 2, bs = long(N) * 4;
  for (int m = 0; m < M; m += 32)
    for (int n = 0; n < N; n += 32) {
      float* c = C + m * ldc + n;
      if (ACC) {
        _tile_loadd(0, c, cs); _tile_loadd(1, c + 16, cs); _tile_loadd(2, c + 16 * ldc, cs); _tile_loadd(3, c + 16 * ldc + 16, cs);
      } else {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      }
      for (int k = 0; k < Kd; k += 32) {
        _tile_loadd(4, A + m * lda + k, as);
        _tile_loadd(5, A + (m + 16) * lda + k, as);
        const uint16_t* b = Bp + long(k / 2) * 2 * N + 2 * n;
        _tile_loadd(6, b, bs);
        _tile_loadd(7, b + 32, bs);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, cs); _tile_stored(1, c + 16, cs); _tile_stored(2, c + 16 * ldc, cs); _tile_stored(3, c + 16 * ldc + 16, cs);
    }
}
#endif

using jbt::num_threads;

// Runs fn(task, worker) for every task in [0, n) on up to num_threads() threads (worker < that):
// tasks go to whichever thread is free, or, if fixed, worker w's tasks are w, w + workers, ... run
// in order by one thread (so that what each worker adds up, and in which order, does not depend on
// timing or on how many threads took part). The threads are the caller and XLA's pool threads
// (jbt::share).
void parallel_for(int n, const std::function<void(int, int)>& fn, bool fixed = false) {
  const int workers = std::max(1, std::min(n, num_threads()));
  if (fixed) {
    jbt::share(workers, workers - 1, [&](int64_t w) {
      for (int t = int(w); t < n; t += workers) fn(t, int(w));
    });
  } else {
    jbt::share(n, workers - 1, [&](int64_t t) { fn(int(t), 0); });
  }
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
  // Vector code over a row's 64 keys (kLanes at a time).
  bool block_mask(int b, int q0, int k0, float* mask) const {
    const int32_t* s = seg + size_t(b) * L;
    const int32_t* r = br ? br + size_t(b) * L : nullptr;
    const int32_t* p = pos ? pos + size_t(b) * L : nullptr;
    vi sk[T / kLanes], rk[T / kLanes], pk[T / kLanes], kj[T / kLanes];
    for (int v = 0; v < T / kLanes; ++v) {
      for (int e = 0; e < kLanes; ++e) {
        int c = k0 + kLanes * v + e;
        bool in = c < L;
        kj[v][e] = in ? c : INT32_MAX;  // past the row: after every query, so never seen
        sk[v][e] = in ? s[c] : -1;
        rk[v][e] = in && r ? r[c] : 0;
        pk[v][e] = in && p ? p[c] : 0;
      }
    }
    vi any = vi{} + 0;
    for (int t = 0; t < T; ++t) {
      int qi = q0 + t;
      for (int v = 0; v < T / kLanes; ++v) {
        vi ok = vi{} + 0;
        if (qi < L) {
          int sq = s[qi];
          ok = (kj[v] <= qi) & (sk[v] == sq);
          if (sq == 0) ok &= kj[v] == qi;  // padding sees itself only
          if (r) ok &= (rk[v] == 0) | (rk[v] == r[qi]);
          if (p && window > 0) ok &= (vi{} + p[qi]) - pk[v] < int32_t(window);
        }
        any |= ok;
        vf m = __builtin_convertvector(ok & 1, vf);
        store(mask + t * T + kLanes * v, m);
      }
    }
    for (int e = 0; e < kLanes; ++e)
      if (any[e]) return true;
    return false;
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

// Scores of rows R of one kv head against key block j (row r = g * T + t; the mask, per (t, c), is
// shared by the G groups) are S * score_scale(P): the matmul's S as is, or, with soft-capping,
// softcap(S * scale) written back by finish_scores.
float score_scale(const Problem& P) { return P.softcap > 0 ? 1.0f : P.scale; }

void finish_scores(const Problem& P, float* S) {
  if (P.softcap <= 0) return;
  for (int i = 0; i < P.rows() * T; ++i) S[i] = P.softcap * std::tanh(S[i] * P.scale / P.softcap);
}

void scores(const Problem& P, const float* Q, const float* kT, float* S) {
  gemm<false>(P.rows(), T, P.H, Q, P.H, 1, kT, T, S, T);
  finish_scores(P, S);
}

// The online softmax's step for one kv head's rows: running max m and sum l updated from the
// scores S, the output accumulator acc rescaled, and P (the new block's probabilities) left in S,
// or as bfloat16 in Pb if given.
void softmax_step(const Problem& P, float* S, const float* mask, float* m, float* l, float* acc, uint16_t* Pb) {
  const float sc = score_scale(P);
  const int R = P.rows();
  thread_local std::vector<float> m_new, corr;
  m_new.resize(R);
  corr.resize(R);
  for (int r = 0; r < R; ++r) {
    const float *s = S + size_t(r) * T, *mk = mask + (r % T) * T;
    vf mx = splat(NEG);
    for (int c = 0; c < T; c += kLanes) mx = vmax(mx, load(mk + c) > 0.0f ? load(s + c) : splat(NEG));
    m_new[r] = std::max(m[r], hmax(mx) * sc);  // sc > 0: the max of the scaled scores
  }
  for (int r = 0; r < R; r += kLanes) store(corr.data() + r, vexp(load(m + r) - load(m_new.data() + r)));  // R = G * 64
  for (int r = 0; r < R; ++r) {
    float* s = S + size_t(r) * T;
    const float* mk = mask + (r % T) * T;
    vf sum = splat(0.0f), mn = splat(m_new[r]);
    for (int c = 0; c < T; c += kLanes) {
      vf p = load(mk + c) > 0.0f ? vexp(load(s + c) * sc - mn) : splat(0.0f);
      if (Pb) store_bf16(Pb + size_t(r) * T + c, p); else store(s + c, p);
      sum += p;
    }
    l[r] = l[r] * corr[r] + hsum(sum);
    m[r] = m_new[r];
    if (corr[r] != 1.0f) {
      vf cv = splat(corr[r]);
      for (int h = 0; h < P.H; h += kLanes) store(acc + size_t(r) * P.H + h, load(acc + size_t(r) * P.H + h) * cv);
    }
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

// A query block's output (acc / l) and log-sum-exp from its kv heads' accumulators [K][R][H] and rows' m, l [K][R].
void write_output(const Problem& P, int b, int i, const float* acc, const float* M, const float* Lsum, const Elems& out,
                  float* lse) {
  int R = P.rows(), H = P.H, K = P.K;
  for (int k = 0; k < K; ++k)
    for (int g = 0; g < P.G; ++g)
      for (int t = 0; t < T && i * T + t < P.L; ++t) {
        int r = g * T + t;
        float l = Lsum[size_t(k) * R + r], inv = 1.0f / l;
        const float* a = acc + (size_t(k) * R + r) * H;
        size_t dst = P.q_index(b, i * T + t, k, g);
        for (int h = 0; h < H; ++h) out.set(dst + h, a[h] * inv);
        lse[((size_t(b) * P.L + i * T + t) * K + k) * P.G + g] = M[size_t(k) * R + r] + std::log(l);
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
        softmax_step(P, S.data(), mask.data(), m, l, a, nullptr);
        gemm<true>(R, H, T, S.data(), T, 1, tile(v, P, b, k, j), H, a, H);
      }
    }
    write_output(P, b, i, acc.data(), M.data(), Lsum.data(), out, lse);
  });
}

// The backward pass's frame: query_block(b, i, dq_block, dk_sums, dv_sums) for every query block,
// which leaves the block's dQ ([K][R][H], float32) in dq_block and adds its key blocks' dK and dV
// into this worker's float32 sums ([B, K, NB] of [T x H], or [H x T] if transposed; at key_at()).
// Each worker takes a fixed share of the query blocks in a fixed order, so the sums, added up at
// the end, are the same bits every run.
size_t key_at(const Problem& P, int b, int k, int j) { return ((size_t(b) * P.K + k) * P.NB + j) * T * P.H; }

template <typename F>
void backward_blocks(const Problem& P, bool transposed, const Elems& dq, const Elems& dk, const Elems& dv,
                     F&& query_block) {
  int H = P.H, K = P.K, NB = P.NB, R = P.rows();
  size_t tiles = size_t(P.B) * K * NB * T * H;
  int workers = std::min(P.B * NB, num_threads());
  std::vector<std::vector<float>> dkw(workers), dvw(workers);
  parallel_for(P.B * NB, [&](int task, int w) {
    int b = task / NB, i = NB - 1 - task % NB;
    if (dkw[w].empty()) { dkw[w].assign(tiles, 0.0f); dvw[w].assign(tiles, 0.0f); }
    thread_local std::vector<float> dQ;
    dQ.assign(size_t(K) * R * H, 0.0f);
    query_block(b, i, dQ.data(), dkw[w].data(), dvw[w].data());
    for (int k = 0; k < K; ++k)
      for (int g = 0; g < P.G; ++g)
        for (int t = 0; t < T && i * T + t < P.L; ++t) {
          const float* src = dQ.data() + (size_t(k) * R + g * T + t) * H;
          size_t dst = P.q_index(b, i * T + t, k, g);
          for (int h = 0; h < H; ++h) dq.set(dst + h, src[h]);
        }
  }, /*fixed=*/true);
  // dk, dv: each key block's sums added up as vectors, then written out token by token.
  parallel_for(P.B * K * NB, [&](int task, int) {
    int b = task / (K * NB), k = task / NB % K, j = task % NB;
    size_t base = key_at(P, b, k, j);
    thread_local std::vector<float> sk, sv;
    sk.assign(size_t(T) * H, 0.0f);
    sv.assign(size_t(T) * H, 0.0f);
    for (size_t w = 0; w < dkw.size(); ++w) {
      if (dkw[w].empty()) continue;
      const float *xk = dkw[w].data() + base, *xv = dvw[w].data() + base;
      for (int e = 0; e < T * H; e += kLanes) {
        store(sk.data() + e, load(sk.data() + e) + load(xk + e));
        store(sv.data() + e, load(sv.data() + e) + load(xv + e));
      }
    }
    for (int c = 0; c < T && j * T + c < P.L; ++c) {
      size_t dst = P.kv_index(b, j * T + c, k);
      for (int h = 0; h < H; ++h) {
        size_t at = transposed ? size_t(h) * T + c : size_t(c) * H + h;
        dk.set(dst + h, sk[at]);
        dv.set(dst + h, sv[at]);
      }
    }
  });
}

void backward(const Problem& P, const Elems& q, const Elems& kx, const Elems& vx, const Elems& out,
              const float* lse, const Elems& dout, const Elems& dq, const Elems& dk, const Elems& dv) {
  std::vector<float> kT = key_tiles(P, kx, true), kN = key_tiles(P, kx, false);
  std::vector<float> vT = key_tiles(P, vx, true);
  int R = P.rows(), H = P.H, K = P.K;
  backward_blocks(P, false, dq, dk, dv, [&](int b, int i, float* dQ, float* dK, float* dV) {
    thread_local std::vector<float> Q, dO, S, dP, mask, lse_r, d_r, O;
    Q.resize(size_t(K) * R * H); dO.resize(size_t(K) * R * H); O.resize(size_t(R) * H);
    lse_r.resize(size_t(K) * R); d_r.resize(size_t(K) * R);
    S.resize(size_t(R) * T); dP.resize(size_t(R) * T); mask.resize(T * T);
    for (int k = 0; k < K; ++k) {
      float *Qk = Q.data() + size_t(k) * R * H, *dOk = dO.data() + size_t(k) * R * H;
      load_rows(P, q, b, i, k, Qk);
      load_rows(P, dout, b, i, k, dOk);
      load_rows(P, out, b, i, k, O.data());
      for (int r = 0; r < R; ++r) {
        int g = r / T, t = i * T + r % T;
        vf d = splat(0.0f);
        for (int h = 0; h < H; h += kLanes) d += load(dOk + size_t(r) * H + h) * load(O.data() + size_t(r) * H + h);
        d_r[size_t(k) * R + r] = hsum(d);
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
          vf l = splat(lse_r[size_t(k) * R + r]), d = splat(d_r[size_t(k) * R + r]), sc = splat(P.scale);
          for (int c = 0; c < T; c += kLanes) {
            vf sv = load(s + c) * score_scale(P);
            vf p = load(mk + c) > 0.0f ? vexp(sv - l) : splat(0.0f);
            vf ds = p * (load(dp + c) - d) * sc;
            if (P.softcap > 0) ds *= 1.0f - (sv / P.softcap) * (sv / P.softcap);
            store(s + c, p);
            store(dp + c, ds);
          }
        }
        size_t at = key_at(P, b, k, j);
        gemm<true>(T, H, R, S.data(), 1, T, dOk, H, dV + at, H);       // dV += P^T dO
        gemm<true>(R, H, T, dP.data(), T, 1, tile(kN, P, b, k, j), H, dQ + size_t(k) * R * H, H);  // dQ += dS K
        gemm<true>(T, H, R, dP.data(), 1, T, Qk, H, dK + at, H);       // dK += dS^T Q
      }
    }
  });
}

#ifdef JBT_AMX
// The same passes with bfloat16 inputs on AMX: the block matmuls read bfloat16 (P and dS rounded to
// it, as flash.py rounds them) and accumulate in float32; the softmax stays float32.

// Key or value blocks of a bfloat16 input as AMX right operands, [B, K, NB] of T * H: pairs of
// tokens (the block as [T x H]) or pairs of head dims (the block transposed, [H x T]); zero past the row.
std::vector<uint16_t> key_pairs(const Problem& P, const Elems& x, bool over_tokens) {
  std::vector<uint16_t> out(size_t(P.B) * P.K * P.NB * T * P.H, 0);
  const uint16_t* bits = static_cast<const uint16_t*>(x.data);
  int H = P.H;
  parallel_for(P.B * P.K * P.NB, [&](int task, int) {
    int b = task / (P.K * P.NB), k = task / P.NB % P.K, j = task % P.NB;
    uint16_t* tile = out.data() + ((size_t(b) * P.K + k) * P.NB + j) * T * H;
    for (int c = 0; c < T && j * T + c < P.L; c += 2) {
      const uint16_t* r0 = bits + P.kv_index(b, j * T + c, k);
      const uint16_t* r1 = j * T + c + 1 < P.L ? bits + P.kv_index(b, j * T + c + 1, k) : nullptr;
      for (int h = 0; h < H; h += 2) {
        uint16_t a0 = r0[h], a1 = r0[h + 1], b0 = r1 ? r1[h] : 0, b1 = r1 ? r1[h + 1] : 0;
        if (over_tokens) {  // [T x H]: (token c, c + 1) pairs of each head dim
          uint16_t* d = tile + size_t(c / 2) * 2 * H + 2 * h;
          d[0] = a0, d[1] = b0, d[2] = a1, d[3] = b1;
        } else {  // [H x T]: (head dim h, h + 1) pairs of each token
          uint16_t* d = tile + size_t(h / 2) * 2 * T + 2 * c;
          d[0] = a0, d[1] = a1, d[2] = b0, d[3] = b1;
        }
      }
    }
  });
  return out;
}

const uint16_t* tile16(const std::vector<uint16_t>& tiles, const Problem& P, int b, int k, int j) {
  return tiles.data() + ((size_t(b) * P.K + k) * P.NB + j) * T * P.H;
}

// A query block's rows of one kv head as bfloat16 [R x H] (row r = g * T + t), and if rowsT is given
// also transposed [H x R]; zero past the row's end.
void load_rows16(const Problem& P, const Elems& x, int b, int i, int k, uint16_t* rows, uint16_t* rowsT) {
  const uint16_t* bits = static_cast<const uint16_t*>(x.data);
  int R = P.rows(), H = P.H;
  for (int g = 0; g < P.G; ++g)
    for (int t = 0; t < T; ++t) {
      int r = g * T + t;
      uint16_t* dst = rows + size_t(r) * H;
      if (i * T + t < P.L) std::memcpy(dst, bits + P.q_index(b, i * T + t, k, g), H * sizeof(uint16_t));
      else std::fill(dst, dst + H, 0);
      if (rowsT)
        for (int h = 0; h < H; ++h) rowsT[size_t(h) * R + r] = dst[h];
    }
}

void forward_amx(const Problem& P, const Elems& q, const Elems& kx, const Elems& vx, const Elems& out, float* lse) {
  std::vector<uint16_t> kT = key_pairs(P, kx, false), v = key_pairs(P, vx, true);
  int R = P.rows(), H = P.H, K = P.K;
  parallel_for(P.B * P.NB, [&](int task, int) {
    int b = task / P.NB, i = P.NB - 1 - task % P.NB;
    thread_local std::vector<float> S, M, Lsum, acc, mask;
    thread_local std::vector<uint16_t> Q, Pb;
    Q.resize(size_t(K) * R * H); Pb.resize(size_t(R) * T); acc.assign(size_t(K) * R * H, 0.0f);
    M.assign(size_t(K) * R, NEG); Lsum.assign(size_t(K) * R, 0.0f);
    S.resize(size_t(R) * T); mask.resize(T * T);
    amx_config();
    for (int k = 0; k < K; ++k) load_rows16(P, q, b, i, k, Q.data() + size_t(k) * R * H, nullptr);
    for (int j = P.first_block[size_t(b) * P.NB + i]; j <= i; ++j) {
      if (!P.block_mask(b, i * T, j * T, mask.data())) continue;
      for (int k = 0; k < K; ++k) {
        amx_gemm<false>(R, T, H, Q.data() + size_t(k) * R * H, H, tile16(kT, P, b, k, j), S.data(), T);
        finish_scores(P, S.data());
        float* a = acc.data() + size_t(k) * R * H;
        softmax_step(P, S.data(), mask.data(), M.data() + size_t(k) * R, Lsum.data() + size_t(k) * R, a, Pb.data());
        amx_gemm<true>(R, H, T, Pb.data(), T, tile16(v, P, b, k, j), a, H);
      }
    }
    _tile_release();
    write_output(P, b, i, acc.data(), M.data(), Lsum.data(), out, lse);
  });
}

void backward_amx(const Problem& P, const Elems& q, const Elems& kx, const Elems& vx, const Elems& out,
                  const float* lse, const Elems& dout, const Elems& dq, const Elems& dk, const Elems& dv) {
  std::vector<uint16_t> kT = key_pairs(P, kx, false), kN = key_pairs(P, kx, true), vT = key_pairs(P, vx, false);
  int R = P.rows(), H = P.H, K = P.K;
  // The key gradients' sums transposed ([H x T]): the AMX products below make them so.
  backward_blocks(P, true, dq, dk, dv, [&](int b, int i, float* dQ, float* dK, float* dV) {
    thread_local std::vector<float> S, dP, mask, lse_r, d_r;
    thread_local std::vector<uint16_t> Q, QT, dO, dOT, O, dSb, PP, dSP;
    size_t rh = size_t(R) * H;
    Q.resize(K * rh); QT.resize(K * rh); dO.resize(K * rh); dOT.resize(K * rh); O.resize(rh);
    lse_r.resize(size_t(K) * R); d_r.resize(size_t(K) * R);
    S.resize(size_t(R) * T); dP.resize(size_t(R) * T); mask.resize(T * T);
    dSb.resize(size_t(R) * T); PP.resize(size_t(R) * T); dSP.resize(size_t(R) * T);
    for (int k = 0; k < K; ++k) {
      load_rows16(P, q, b, i, k, Q.data() + k * rh, QT.data() + k * rh);
      load_rows16(P, dout, b, i, k, dO.data() + k * rh, dOT.data() + k * rh);
      load_rows16(P, out, b, i, k, O.data(), nullptr);
      for (int r = 0; r < R; ++r) {
        int g = r / T, t = i * T + r % T;
        const uint16_t *o = O.data() + size_t(r) * H, *d_o = dO.data() + k * rh + size_t(r) * H;
        vf d = splat(0.0f);
        for (int h = 0; h < H; h += kLanes) d += load_bf16(d_o + h) * load_bf16(o + h);
        d_r[size_t(k) * R + r] = hsum(d);
        lse_r[size_t(k) * R + r] = t < P.L ? lse[((size_t(b) * P.L + t) * K + k) * P.G + g] : 0.0f;
      }
    }
    amx_config();
    for (int j = P.first_block[size_t(b) * P.NB + i]; j <= i; ++j) {
      if (!P.block_mask(b, i * T, j * T, mask.data())) continue;
      for (int k = 0; k < K; ++k) {
        amx_gemm<false>(R, T, H, Q.data() + k * rh, H, tile16(kT, P, b, k, j), S.data(), T);
        finish_scores(P, S.data());
        amx_gemm<false>(R, T, H, dO.data() + k * rh, H, tile16(vT, P, b, k, j), dP.data(), T);
        vf sc = splat(P.scale), ss = splat(score_scale(P));
        for (int r = 0; r < R; r += 2) {  // rows in pairs: P and dS as AMX right operands (pairs of rows)
          const float* mk = mask.data() + (r % T) * T;
          vf l0 = splat(lse_r[size_t(k) * R + r]), l1 = splat(lse_r[size_t(k) * R + r + 1]);
          vf d0 = splat(d_r[size_t(k) * R + r]), d1 = splat(d_r[size_t(k) * R + r + 1]);
          for (int c = 0; c < T; c += kLanes) {
            vf s0 = load(S.data() + size_t(r) * T + c) * ss, s1 = load(S.data() + size_t(r + 1) * T + c) * ss;
            vf p0 = load(mk + c) > 0.0f ? vexp(s0 - l0) : splat(0.0f);
            vf p1 = load(mk + T + c) > 0.0f ? vexp(s1 - l1) : splat(0.0f);
            vf ds0 = p0 * (load(dP.data() + size_t(r) * T + c) - d0) * sc;
            vf ds1 = p1 * (load(dP.data() + size_t(r + 1) * T + c) - d1) * sc;
            if (P.softcap > 0) {
              ds0 *= 1.0f - (s0 / P.softcap) * (s0 / P.softcap);
              ds1 *= 1.0f - (s1 / P.softcap) * (s1 / P.softcap);
            }
            store_bf16(dSb.data() + size_t(r) * T + c, ds0);
            store_bf16(dSb.data() + size_t(r + 1) * T + c, ds1);
            store_pairs(PP.data() + size_t(r / 2) * 2 * T + 2 * c, p0, p1);
            store_pairs(dSP.data() + size_t(r / 2) * 2 * T + 2 * c, ds0, ds1);
          }
        }
        size_t at = key_at(P, b, k, j);
        amx_gemm<true>(H, T, R, dOT.data() + k * rh, R, PP.data(), dV + at, T);  // dV^T += dO^T P
        amx_gemm<true>(H, T, R, QT.data() + k * rh, R, dSP.data(), dK + at, T);  // dK^T += Q^T dS
        amx_gemm<true>(R, H, T, dSb.data(), T, tile16(kN, P, b, k, j), dQ + k * rh, H);  // dQ += dS K
      }
    }
    _tile_release();
  });
}
#endif

// AMX for bfloat16 inputs whose head dim fits its tiles, where the CPU and the OS allow it.
bool use_amx(const Elems& q, const Elems& k, const Elems& v, int H) {
#ifdef JBT_AMX
  return q.bf16 && k.bf16 && v.bf16 && H % 32 == 0 && amx_usable();
#else
  (void)q, (void)k, (void)v, (void)H;
  return false;
#endif
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

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> seg,
                       ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> window,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                       int64_t sliding_window, bool has_branches, float scale, float softcap) {
  if (auto e = check(q, k, v); e.failure()) return e;
  jbt::PoolScope<ffi::ThreadPool> scope(pool);
  Problem P = problem(q, seg, br, pos, window, sliding_window, has_branches, scale, softcap);
#ifdef JBT_AMX
  if (use_amx(elems(q), elems(k), elems(v), P.H)) {
    forward_amx(P, elems(q), elems(k), elems(v), elems(out), lse->typed_data());
    return ffi::Error::Success();
  }
#endif
  forward(P, elems(q), elems(k), elems(v), elems(out), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> seg,
                        ffi::Buffer<ffi::S32> br, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> window,
                        ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout,
                        ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                        int64_t sliding_window, bool has_branches, float scale, float softcap) {
  if (auto e = check(q, k, v); e.failure()) return e;
  jbt::PoolScope<ffi::ThreadPool> scope(pool);
  Problem P = problem(q, seg, br, pos, window, sliding_window, has_branches, scale, softcap);
#ifdef JBT_AMX
  if (use_amx(elems(q), elems(k), elems(v), P.H) && elems(out).bf16 && elems(dout).bf16) {
    backward_amx(P, elems(q), elems(k), elems(v), elems(out), lse.typed_data(), elems(dout), elems(dq), elems(dk),
                 elems(dv));
    return ffi::Error::Success();
  }
#endif
  backward(P, elems(q), elems(k), elems(v), elems(out), lse.typed_data(), elems(dout), elems(dq), elems(dk),
           elems(dv));
  return ffi::Error::Success();
}

}  // namespace

namespace {
// The arguments both passes take first: XLA's thread pool, q, k, v, segment, branch and position
// ids, the window.
auto with_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

// The attributes both passes take last.
template <typename Binding>
auto with_attrs(Binding&& binding) {
  return std::move(binding)
      .template Attr<int64_t>("sliding_window")
      .template Attr<bool>("has_branches")
      .template Attr<float>("scale")
      .template Attr<float>("softcap");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtAttentionForward, ForwardImpl,
                              with_attrs(with_inputs().Ret<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>()));

// out, lse and dout after the inputs; dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtAttentionBackward, BackwardImpl,
                              with_attrs(with_inputs()
                                             .Arg<ffi::AnyBuffer>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::AnyBuffer>()
                                             .Ret<ffi::AnyBuffer>()
                                             .Ret<ffi::AnyBuffer>()
                                             .Ret<ffi::AnyBuffer>()));
