// A small SIMD shim for the CPU kernels: float32 vectors of 16 lanes with AVX-512, 8 with AVX2 + FMA + F16C, chosen
// at compile time (the extension is built with -march=native); HELIOS_SIMD is undefined without either, and callers
// keep a plain-loop path.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define HELIOS_SIMD 1
namespace helios::simd {
using Vec = __m512;
constexpr int64_t kLanes = 16;
constexpr int64_t kMR = 6;  // input rows per register block: 6 x 4 accumulators + 6 inputs + 1 weight of 32 registers
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load_first(const float* p, int64_t n) {  // p[0:n], zeros in lanes n.. (n < kLanes); reads only p[0:n]
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec broadcast(float v) { return _mm512_set1_ps(v); }
inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline __m128i load_bytes(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline Vec from_bytes(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
// kLanes IEEE half / bfloat16 values (their bits) as float32 (exact)
inline Vec from_half(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec from_bfloat16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec round(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec times_pow2(Vec v, Vec n) { return _mm512_scalef_ps(v, n); }  // v * 2^n, n integral
inline float max_of(Vec v) { return _mm512_reduce_max_ps(v); }
inline Vec first_or(Vec v, int64_t n, float fill) {  // lanes 0..n-1 of v, `fill` in the others
  return _mm512_mask_blend_ps(static_cast<__mmask16>((1u << n) - 1), broadcast(fill), v);
}
// Lane i = the sum of the lanes of v[i], for kLanes vectors (a transpose folded into an add tree: 45 shuffles and
// adds instead of 16 horizontal sums).
inline Vec transpose_sum(const Vec* v) {
  Vec u[4];
  for (int q = 0; q < 4; ++q) {
    const Vec* w = v + 4 * q;
    const Vec t0 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const Vec t1 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    // per 128-bit chunk c: [w0, w1, w2, w3 summed over chunk c]
    u[q] = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  }
  const Vec w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const Vec w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}
}  // namespace helios::simd
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HELIOS_SIMD 1
namespace helios::simd {
using Vec = __m256;
constexpr int64_t kLanes = 8;
constexpr int64_t kMR = 3;  // input rows per register block: 3 x 4 accumulators + 3 inputs + 1 weight of 16 registers
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load_first(const float* p, int64_t n) {  // p[0:n], zeros in lanes n.. (n < kLanes); reads only p[0:n]
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
}
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec broadcast(float v) { return _mm256_set1_ps(v); }
inline float sum(Vec v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}
inline __m128i load_bytes(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline Vec from_bytes(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
// kLanes IEEE half / bfloat16 values (their bits) as float32 (exact; every AVX2 CPU has F16C)
inline Vec from_half(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec from_bfloat16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec round(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec times_pow2(Vec v, Vec n) {  // v * 2^n for integral n in [-126, 127]: n added to the exponent bits
  const __m256i bits = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(v), bits));
}
inline float max_of(Vec v) {
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}
inline Vec first_or(Vec v, int64_t n, float fill) {  // lanes 0..n-1 of v, `fill` in the others
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
  return _mm256_blendv_ps(broadcast(fill), v, keep);
}
// Lane i = the sum of the lanes of v[i], for kLanes vectors (a transpose folded into an add tree).
inline Vec transpose_sum(const Vec* v) {
  Vec u[2];
  for (int q = 0; q < 2; ++q) {
    const Vec* w = v + 4 * q;
    const Vec t0 = _mm256_add_ps(_mm256_unpacklo_ps(w[0], w[1]), _mm256_unpackhi_ps(w[0], w[1]));
    const Vec t1 = _mm256_add_ps(_mm256_unpacklo_ps(w[2], w[3]), _mm256_unpackhi_ps(w[2], w[3]));
    u[q] = _mm256_add_ps(_mm256_shuffle_ps(t0, t1, 0x44), _mm256_shuffle_ps(t0, t1, 0xEE));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}
}  // namespace helios::simd
#else
namespace helios::simd {
constexpr int64_t kMR = 3;
}
#endif

#ifdef HELIOS_SIMD
namespace helios::simd {
// e^x for x <= 88 (inputs below -87 give ~0): x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial
// (Cephes' expf coefficients; relative error ~2e-7), then scaled by 2^n.
inline Vec exp(Vec x) {
  x = max(x, broadcast(-87.0f));
  const Vec n = round(mul(x, broadcast(1.44269504088896341f)));
  Vec r = fma(n, broadcast(-0.693359375f), x);  // ln2 split in two for an exact first step
  r = fma(n, broadcast(2.12194440e-4f), r);
  Vec p = broadcast(1.9875691500e-4f);
  p = fma(p, r, broadcast(1.3981999507e-3f));
  p = fma(p, r, broadcast(8.3334519073e-3f));
  p = fma(p, r, broadcast(4.1665795894e-2f));
  p = fma(p, r, broadcast(1.6666665459e-1f));
  p = fma(p, r, broadcast(5.0000001201e-1f));
  p = fma(p, mul(r, r), r);
  return times_pow2(add(p, broadcast(1.0f)), n);
}
}  // namespace helios::simd
#endif

namespace helios::simd {
// Asks for the cache line holding p[i] (into every cache level). A prefetch is a hint that never faults, so i may
// point past the array (the address is computed as an integer). An asm statement, not __builtin_prefetch: GCC 12
// silently deleted the builtin from inlined kernel code (gemm::direct_rows' next-tile prefetch, the paged attention's
// block prefetches).
template <typename T>
inline void prefetch(const T* p, int64_t i) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p) + sizeof(T) * i;
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 (%0)" : : "r"(address));
#else
  __builtin_prefetch(reinterpret_cast<const void*>(address), 0, 3);
#endif
}
}  // namespace helios::simd
