// A lane group of kLanes pixels of one tile row as a GCC vector the width of one register of the -march
// the extension is built with (cpp_backend builds for the building CPU and keys its cache by that CPU's
// flags): 16 floats on AVX-512, 8 on AVX2 and elsewhere (two SSE/NEON registers). A group that took two
// registers would spill the per-tile transmittance and colour vectors. Only the mask extraction uses
// intrinsics.
//
// fast_exp: exp(x) to within 2^-22 relative (measured over [-87, 88] in test_rasterize_simd.py), 0 below -87.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lgr_simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
constexpr uint32_t kLaneBits = (uint32_t{1} << kLanes) - 1;
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
inline VecI load_i(const int32_t* p) {
  VecI v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_i(int32_t* p, VecI v) { std::memcpy(p, &v, sizeof v); }

// Lane i + origin: with origin = x + 0.5, the pixel centres of a lane group starting at column x.
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
  __m256 v;
  std::memcpy(&v, &m, sizeof v);
  return static_cast<uint32_t>(_mm256_movemask_ps(v));
#else
  uint32_t out = 0;
  for (int i = 0; i < kLanes; ++i) out |= static_cast<uint32_t>(m[i] < 0) << i;
  return out;
#endif
}

// -1 in lane i where bit q * kLanes + i of a tile row's 16-pixel mask is set: lane group q's pixels.
inline VecI span_lanes(int32_t row_bits, int q) {
  VecI one_hot;
  for (int i = 0; i < kLanes; ++i) one_hot[i] = 1 << i;
  return (splat_i(row_bits >> (q * kLanes)) & one_hot) != 0;
}

inline VecF select(VecI m, VecF a, VecF b) { return m ? a : b; }

// Square root of each lane (all >= 0).
inline VecF sqrt(VecF v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof x);
  x = _mm512_sqrt_ps(x);
  std::memcpy(&v, &x, sizeof v);
#elif defined(__AVX2__)
  __m256 x;
  std::memcpy(&x, &v, sizeof x);
  x = _mm256_sqrt_ps(x);
  std::memcpy(&v, &x, sizeof v);
#else
  for (int i = 0; i < kLanes; ++i) v[i] = __builtin_sqrtf(v[i]);
#endif
  return v;
}

// Floor and ceiling of lanes inside int32's range: truncate, then step toward -inf / +inf.
inline VecI floor_i(VecF v) {
  const VecI t = __builtin_convertvector(v, VecI);
  return t + (__builtin_convertvector(t, VecF) > v);  // true is -1
}
inline VecI ceil_i(VecF v) {
  const VecI t = __builtin_convertvector(v, VecI);
  return t - (__builtin_convertvector(t, VecF) < v);
}

inline VecF clamp(VecF v, float lo, float hi) { return v > lo ? (v < hi ? v : splat(hi)) : splat(lo); }

// exp(x): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split), e^r by its degree-7 Taylor polynomial
// (truncation < 6e-9 relative) in Estrin's form, whose dependency chain is three multiply-adds deep
// instead of Horner's seven, times 2^n built in the exponent bits. Separate multiplies and adds, so the
// result does not depend on FMA contraction.
inline VecF fast_exp(VecF x) {
  const VecI underflow = x < -87.0f;
  x = x > 88.0f ? splat(88.0f) : x;
  x = underflow ? splat(0.0f) : x;
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723e-6f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const VecF n = (x * log2e + shifter) - shifter;
  const VecF r = (x - n * ln2_hi) - n * ln2_lo;
  const VecF r2 = r * r;
  const VecF p01 = r + 1.0f, p23 = r * (1.0f / 6.0f) + 0.5f;
  const VecF p45 = r * (1.0f / 120.0f) + 1.0f / 24.0f, p67 = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  const VecF p = (p01 + r2 * p23) + (r2 * r2) * (p45 + r2 * p67);
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

// out[i] = hsum(v[i]) for i < count, eight at a time with AVX2's horizontal adds (a different but fixed
// order of the same additions: the same bits for any thread count).
inline void hsums(const VecF* v, int count, float* out) {
  int i = 0;
#if defined(__AVX2__) && !defined(__AVX512F__)
  for (; i + 8 <= count; i += 8) {
    __m256 x[8];
    std::memcpy(x, v + i, sizeof x);
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(x[4], x[5]), _mm256_hadd_ps(x[6], x[7]));
    // a = [v0 v1 v2 v3 | v0 v1 v2 v3] partial sums of the low and high 128-bit halves; likewise b.
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    _mm256_storeu_ps(out + i, sums);
  }
#endif
  for (; i < count; ++i) out[i] = hsum(v[i]);
}

}  // namespace lgr_simd
