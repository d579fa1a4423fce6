// 16-lane float32 vectors (GCC/Clang vector extensions: AVX-512 registers where the CPU has them,
// pairs or quads of narrower ones elsewhere), exp, and bfloat16 loads and stores: shared by jbt's
// C++ kernels (jbt/runtime/kernels.py puts this folder on the include path and every header here
// in each build's cache key).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace jbt {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u32v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));

inline v16 splat(float x) { return v16{} + x; }
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
inline v16 vmin(v16 a, v16 b) { return a < b ? a : b; }

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

// Round to nearest even; the bfloat16 is the top 16 bits (finite values).
inline u32v rounded_bits(v16 x) { u32v u; std::memcpy(&u, &x, sizeof u); return u + 0x7fffu + ((u >> 16) & 1u); }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// 16 floats as 16 bfloat16 (round to nearest even, one instruction).
inline void store_bf16(uint16_t* p, v16 x) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(__m512(x))); }
#else
// 16 floats as 16 bfloat16.
inline void store_bf16(uint16_t* p, v16 x) {
  h16v h = __builtin_convertvector(rounded_bits(x) >> 16, h16v);
  std::memcpy(p, &h, sizeof h);
}
#endif
// 16 bfloat16 as floats.
inline v16 load_bf16(const uint16_t* p) {
  h16v h;
  std::memcpy(&h, p, sizeof h);
  u32v u = __builtin_convertvector(h, u32v) << 16;
  v16 f;
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
