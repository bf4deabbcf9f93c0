// One tile row (16 pixels) as a GCC vector: the compiler lowers it to one AVX-512 register, two AVX2
// registers or four SSE/NEON registers for the -march the extension is built with (cpp_build.py builds
// for the building CPU and keys its cache by that CPU's flags). Only the mask extraction uses intrinsics.
//
// fast_exp: exp(x) to within 2^-22 relative (measured over [-87, 88] in test_rasterize_simd.py), 0 below -87.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lgr_simd {

constexpr int kLanes = 16;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline const char* isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

inline VecF splat(float v) { return VecF{} + v; }
inline VecI splat_i(int32_t v) { return VecI{} + v; }

inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }

// Lane i + 0.5 + origin: the pixel centres of one tile row.
inline VecF lane_centres(float origin) {
  VecF v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(i) + origin;
  return v;
}

// Bit i set where lane i of a comparison result (-1 / 0) is set.
inline uint32_t bits(VecI m) {
#if defined(__AVX512F__)
  __m512i v;
  std::memcpy(&v, &m, sizeof v);
  return _mm512_cmplt_epi32_mask(v, _mm512_setzero_si512());
#elif defined(__AVX2__)
  __m256 halves[2];
  std::memcpy(halves, &m, sizeof halves);
  return static_cast<uint32_t>(_mm256_movemask_ps(halves[0])) |
         (static_cast<uint32_t>(_mm256_movemask_ps(halves[1])) << 8);
#else
  uint32_t out = 0;
  for (int i = 0; i < kLanes; ++i) out |= static_cast<uint32_t>(m[i] < 0) << i;
  return out;
#endif
}

// The inverse of bits(): -1 in lanes whose bit is set.
inline VecI lanes(uint32_t mask) {
  VecI one_hot;
  for (int i = 0; i < kLanes; ++i) one_hot[i] = 1 << i;
  return (one_hot & static_cast<int32_t>(mask)) != 0;
}

inline VecF select(VecI m, VecF a, VecF b) { return m ? a : b; }

// exp(x): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split), e^r by its degree-7 Taylor polynomial
// (truncation < 6e-9 relative), times 2^n built in the exponent bits. Separate multiplies and adds, so
// the result does not depend on FMA contraction.
inline VecF fast_exp(VecF x) {
  const VecI underflow = x < -87.0f;
  x = x > 88.0f ? splat(88.0f) : x;
  x = underflow ? splat(0.0f) : x;
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723e-6f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VecF n = (x * log2e + shifter) - shifter;
  const VecF r = (x - n * ln2_hi) - n * ln2_lo;
  VecF p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VecI scale = __builtin_convertvector(n, VecI) << 23;
  VecI out;
  std::memcpy(&out, &p, sizeof out);
  out += scale;
  VecF result;
  std::memcpy(&result, &out, sizeof result);
  return underflow ? splat(0.0f) : result;
}

inline float hsum(VecF v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];  // fixed order: the same bits for any thread count
  return s;
}

}  // namespace lgr_simd
