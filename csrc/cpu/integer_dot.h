// Integer dot products for int8 / int4 weights at batch sizes where the arithmetic, not the weight bytes, bounds
// a linear (kMinRows rows and more, up to gemm::kSmallM): the float32 kernel converts every weight to float
// and spends one 16-lane FMA per 16 multiply-adds; AVX-512 VNNI's vpdpbusd does 64 (u8 x s8 -> int32) in one.
//
// Activations are rounded per row and group of 32 along K: x ≈ xs * q, xs = max|x| / L, q = round(x / xs) in [-L, L]
// (helios.ops.quant.quantize_activations is the same in torch). int8 (L = 127, llama.cpp's Q8_0) is w8a8 / w4a8's
// choice, at a cost in greedy agreement; int16 (L = 32,639, an error of ~1.5e-5 of the group's largest value) is
// int8 / int4's: two vpdpbusd per four k (one per int8 half of q), still 32 multiply-adds an instruction, twice
// the float32 FMA's (a gate_up at 32 rows: 0.51 -> 0.36 ms). With a weight group w = s * u + mn (u the stored
// integers), a group's contribution is exactly xs * (s * Σ q·u + mn * Σ q): one int32 dot product and two float FMAs
// per group of 32, and the result equals x̂·Wᵀ with x̂ = xs * q.
//
// Layout (the batch is the vector dimension, as in gemm's wide kernel): q packed four consecutive k per int32 lane,
// xq[(k / 4) * Mp + m]; xs and xs * Σq per group, [g * Mp + m]; rows past M are zeros.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"

#if defined(HELIOS_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HELIOS_INTEGER_DOT 1
#endif

namespace helios::integer_dot {

#ifdef HELIOS_INTEGER_DOT
constexpr bool kAvailable = true;
#else
constexpr bool kAvailable = false;
#endif
constexpr int64_t kGroup = 32;
// From this many rows the integer kernel runs. Its cost is flat up to 16 rows (a vector of them), the float kernels'
// grows with the rows: at 8 they were even (a whole int8 decode step at batch 8 too), at 12 the integer one was
// 1.2-1.5x faster (gate_up, down, LM head; kernel microbenchmark).
constexpr int64_t kMinRows = 12;

// x [M, K] (K a multiple of kGroup) rounded per group to int8 (Bits 8) or int16 (Bits 16), in the kernel's layout.
// An int16 q is held as two int8 halves, q = 256 * hi + lo with hi and lo in [-128, 127], each multiplied with
// vpdpbusd: Σ u·q = 256 * Σ u·hi + Σ u·lo, exact in int32 (|Σ u·q| <= 32 * 255 * 32639 < 2^31).
struct QuantizedRows {
  std::vector<int32_t> q;   // [K / 4, Mp]: four int8 of row m at k..k+3 (Bits 16: the high halves)
  std::vector<int32_t> lo;  // Bits 16: the low halves, laid out as q; else empty
  std::vector<float> scale;  // [K / 32, Mp]: xs
  std::vector<float> qsum;   // [K / 32, Mp]: xs * Σ q over the group
  int64_t Mp = 0;  // rows padded to whole vectors
};

#ifdef HELIOS_INTEGER_DOT

// The largest |q|: int8 symmetric (llama.cpp's Q8_0); int16 such that hi = (q + 128) >> 8 stays in [-127, 127].
template <int Bits>
constexpr float kLevels = Bits == 8 ? 127.f : 32639.f;

template <int Bits>
inline void quantize_rows(const float* x, int64_t M, int64_t K, QuantizedRows& out) {
  static_assert(Bits == 8 || Bits == 16);
  constexpr float levels = kLevels<Bits>;
  const int64_t Mp = gemm::padded_rows(M), groups = K / kGroup;
  out.Mp = Mp;
  out.q.assign(K / 4 * Mp, 0);
  if constexpr (Bits == 16) out.lo.assign(K / 4 * Mp, 0);
  out.scale.assign(groups * Mp, 0.f);
  out.qsum.assign(groups * Mp, 0.f);
  const __m512 top = _mm512_set1_ps(levels), bottom = _mm512_set1_ps(-levels);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = x + m * K + g * kGroup;
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      const float absmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float scale = absmax / levels, inverse = absmax > 0.f ? levels / absmax : 0.f;
      const __m512 inv = _mm512_set1_ps(inverse);
      // rounded under the default rounding mode (half to even, as torch.round), clamped in float as the oracle is
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v0, inv), bottom), top));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v1, inv), bottom), top));
      const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      alignas(32) int32_t hi[kGroup / 4], lo[kGroup / 4];  // the group's 32 int8 halves, four per word
      if constexpr (Bits == 8) {
        _mm_store_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtepi32_epi8(q0));
        _mm_store_si128(reinterpret_cast<__m128i*>(hi + 4), _mm512_cvtepi32_epi8(q1));
      } else {
        const __m512i bias = _mm512_set1_epi32(128);
        const __m512i h0 = _mm512_srai_epi32(_mm512_add_epi32(q0, bias), 8);  // floor((q + 128) / 256)
        const __m512i h1 = _mm512_srai_epi32(_mm512_add_epi32(q1, bias), 8);
        _mm_store_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtepi32_epi8(h0));
        _mm_store_si128(reinterpret_cast<__m128i*>(hi + 4), _mm512_cvtepi32_epi8(h1));
        const __m512i l0 = _mm512_sub_epi32(q0, _mm512_slli_epi32(h0, 8));  // q - 256 * hi
        const __m512i l1 = _mm512_sub_epi32(q1, _mm512_slli_epi32(h1, 8));
        _mm_store_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtepi32_epi8(l0));
        _mm_store_si128(reinterpret_cast<__m128i*>(lo + 4), _mm512_cvtepi32_epi8(l1));
      }
      for (int quad = 0; quad < kGroup / 4; ++quad) {
        const int64_t at = (g * kGroup / 4 + quad) * Mp + m;
        out.q[at] = hi[quad];
        if constexpr (Bits == 16) out.lo[at] = lo[quad];
      }
      out.scale[g * Mp + m] = scale;
      out.qsum[g * Mp + m] = scale * static_cast<float>(sum);
    }
  }
}

// Four stored integers of a weight row at k = 4 * quad within a group, as the unsigned bytes of one int32.
template <int Bits>
inline int32_t weight_quad(const uint8_t* group, int quad) {
  int32_t word;
  if constexpr (Bits == 8) {
    std::memcpy(&word, group + 4 * quad, 4);
  } else {  // values 0..15 of a group are the low nibbles of its 16 bytes, 16..31 the high ones
    uint32_t bytes;
    std::memcpy(&bytes, group + 4 * (quad % 4), 4);
    word = static_cast<int32_t>((quad < 4 ? bytes : bytes >> 4) & 0x0F0F0F0Fu);
  }
  return word;
}

// dot[r][v] += the stored integers of rows q[r] (group at `offset` bytes) · x's int8 values `xq` of group g.
template <int NR, int MV, int WeightBits>
inline void group_dot(__m512i (&dot)[NR][MV], const int32_t* xq, int64_t g, int64_t Mp, int64_t m0,
                      const uint8_t* const (&q)[NR], int64_t offset) {
#pragma GCC unroll 8
  for (int quad = 0; quad < kGroup / 4; ++quad) {
    const int32_t* xk = xq + (g * kGroup / 4 + quad) * Mp + m0;
    __m512i xv[MV];
#pragma GCC unroll 3
    for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_si512(xk + 16 * v);
#pragma GCC unroll 12
    for (int r = 0; r < NR; ++r) {
      const __m512i wv = _mm512_set1_epi32(weight_quad<WeightBits>(q[r] + offset, quad));
#pragma GCC unroll 3
      for (int v = 0; v < MV; ++v) dot[r][v] = _mm512_dpbusd_epi32(dot[r][v], wv, xv[v]);
    }
  }
}

// Output rows n0..n0+NR-1 (those past `valid` are padding, never written) for input rows m0..m0+rows-1 of x, rounded
// to ActBits (8 or 16) bits.
template <int MV, int ActBits, typename Tiles>
void block(const QuantizedRows& x, int64_t m0, int64_t rows, const Tiles& w, int64_t n0, int64_t valid,
           const gemm::Epilogue& epi) {
  constexpr int NR = 12 / MV;  // 2 x NR x MV accumulators (int32 and float) of AVX-512's 32 registers
  constexpr int64_t kGroupBytes = Tiles::kGroupBytes;
  const int64_t groups = w.groups(), Mp = x.Mp;
  const uint8_t* q[NR];
  int64_t at[NR];  // index of the row's first group scale and minimum
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + std::min<int64_t>(r, valid - 1);
    q[r] = w.row(n / gemm::kNR, 0, n % gemm::kNR);
    at[r] = w.at(n / gemm::kNR, 0, n % gemm::kNR);
  }
  __m512 acc[NR][MV];
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t step = g * gemm::kNR;  // groups of one row are kNR groups apart
    __m512i dot[NR][MV];
#pragma GCC unroll 12
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < MV; ++v) dot[r][v] = _mm512_setzero_si512();
    group_dot<NR, MV, Tiles::kBits>(dot, x.q.data(), g, Mp, m0, q, step * kGroupBytes);
    if constexpr (ActBits == 16) {  // 256 * Σ u·hi + Σ u·lo
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r)
#pragma GCC unroll 3
        for (int v = 0; v < MV; ++v) dot[r][v] = _mm512_slli_epi32(dot[r][v], 8);
      group_dot<NR, MV, Tiles::kBits>(dot, x.lo.data(), g, Mp, m0, q, step * kGroupBytes);
    }
#pragma GCC unroll 3
    for (int v = 0; v < MV; ++v) {
      const __m512 xs = _mm512_loadu_ps(x.scale.data() + g * Mp + m0 + 16 * v);
      const __m512 xsum = _mm512_loadu_ps(x.qsum.data() + g * Mp + m0 + 16 * v);
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r) {
        const __m512 s = _mm512_set1_ps(w.scale[at[r] + step]), mn = _mm512_set1_ps(w.minimum[at[r] + step]);
        const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][v]), xs);
        acc[r][v] = _mm512_fmadd_ps(xsum, mn, _mm512_fmadd_ps(scaled, s, acc[r][v]));
      }
    }
  }
  alignas(64) float out[NR][MV * 16];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) _mm512_store_ps(&out[r][16 * v], acc[r][v]);
  epi.put_transposed(m0, rows, n0, valid, &out[0][0], MV * 16);
}
#endif

// Output rows of tiles [t_begin, t_end) for all M (<= gemm::kSmallM) rows of x, already rounded to ActBits (8 or 16)
// by quantize_rows, on the calling thread.
template <int ActBits, typename Tiles>
void rounded_range(const QuantizedRows& xq, int64_t M, int64_t t_begin, int64_t t_end, const Tiles& w,
                   const gemm::Epilogue& epi) {
#ifdef HELIOS_INTEGER_DOT
  const int64_t n_begin = t_begin * gemm::kNR, n_end = std::min(t_end * gemm::kNR, epi.N);
  constexpr int64_t kBlock = gemm::kWideVectors * 16;  // input rows per block: MV <= kWideVectors vectors
  for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
    const int64_t rows = std::min<int64_t>(kBlock, M - m0);
    gemm::with_count<gemm::kWideVectors>((rows + 15) / 16, [&](auto mv) {
      constexpr int NR = 12 / mv.value;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += NR)
        block<mv.value, ActBits>(xq, m0, rows, w, n0, std::min<int64_t>(NR, n_end - n0), epi);
    });
  }
#else
  (void)xq, (void)M, (void)t_begin, (void)t_end, (void)w, (void)epi;
  TORCH_CHECK(false, "integer_dot::rounded_range: this build has no AVX-512 VNNI");
#endif
}

// x [M, K] rounded to ActBits into `out` (quantize_rows), where this build has integer dot products.
template <int ActBits>
void round_rows(const float* x, int64_t M, int64_t K, QuantizedRows& out) {
#ifdef HELIOS_INTEGER_DOT
  quantize_rows<ActBits>(x, M, K, out);
#else
  (void)x, (void)M, (void)K, (void)out;
  TORCH_CHECK(false, "integer_dot::round_rows: this build has no AVX-512 VNNI");
#endif
}

}  // namespace helios::integer_dot
