// float32 vectors of the target's native width (GCC/Clang vector extensions): kLanes = 16 where
// the build targets AVX-512, 8 elsewhere (AVX2's registers; a wider type would be lowered through
// the stack there). With exp, horizontal max and sum, and bfloat16 loads and stores: shared by
// jbt's C++ kernels (jbt/runtime/kernels.py puts this folder on the include path and every header
// here in each build's cache key). Elementwise results do not depend on the width; reductions
// (hmax, hsum, and sums kept per lane) add in a width-dependent order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#define JBT_LANES 16
#else
#define JBT_LANES 8
#endif

namespace jbt {

constexpr int kLanes = JBT_LANES;

typedef float vf __attribute__((vector_size(4 * JBT_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * JBT_LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * JBT_LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * JBT_LANES)));

// x in every lane: x - 0 is x for every x, so the compiler drops the subtraction (0 + x, which
// turns -0 into +0, costs an add before every broadcast).
inline vf splat(float x) { return x - vf{}; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

// exp(x) for x <= 88 (float32 relative error ~2e-7); 0 below -87.
inline vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  vf xc = vmax(vmin(x, splat(88.0f)), lo);
  vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  vf y = p * scale;
  return x < lo ? splat(0.0f) : y;
}

#ifdef __AVX512F__
inline float hmax(vf v) { return _mm512_reduce_max_ps(__m512(v)); }
inline float hsum(vf v) { return _mm512_reduce_add_ps(__m512(v)); }
#else
// Halving trees (a loop over the lanes adds them one after another).
typedef float v4 __attribute__((vector_size(16)));
inline float hmax(vf v) {
  v4 c = {v[0], v[1], v[2], v[3]}, d = {v[4], v[5], v[6], v[7]};
  c = c > d ? c : d;
  return std::max(std::max(c[0], c[1]), std::max(c[2], c[3]));
}
inline float hsum(vf v) {
  v4 c = {v[0], v[1], v[2], v[3]}, d = {v[4], v[5], v[6], v[7]};
  c += d;
  return (c[0] + c[1]) + (c[2] + c[3]);
}
#endif

// Round to nearest even; the bfloat16 is the top 16 bits (finite values).
inline vu rounded_bits(vf x) { vu u; std::memcpy(&u, &x, sizeof u); return u + 0x7fffu + ((u >> 16) & 1u); }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// kLanes floats as bfloat16 (round to nearest even, one instruction).
inline void store_bf16(uint16_t* p, vf x) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(__m512(x))); }
#else
// kLanes floats as bfloat16.
inline void store_bf16(uint16_t* p, vf x) {
  vh h = __builtin_convertvector(rounded_bits(x) >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}
#endif
// kLanes bfloat16 as floats.
inline vf load_bf16(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_f32(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace jbt
