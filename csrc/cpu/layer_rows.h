// One row of each decoder-layer elementwise op, rounding exactly where its torch reference (helios.ops.layer_ops)
// rounds. Shared by the per-op kernels (layer_ops.cpp) and the fused decode stack (decode_stack.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace helios {

// The value a float becomes when torch stores it in scalar_t (identity for float).
template <typename scalar_t>
inline float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// One RMSNorm row. (Loops with pragmas live in functions: a pragma cannot sit inside a dispatch macro.)
template <typename scalar_t>
inline void rms_norm_row(const scalar_t* row, const scalar_t* w, scalar_t* o, int64_t d, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += static_cast<float>(row[i]) * static_cast<float>(row[i]);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
  // reference: weight * (x_fp32 * rsqrt(mean + eps)).to(dtype)
  for (int64_t i = 0; i < d; ++i)
    o[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * round_to<scalar_t>(static_cast<float>(row[i]) * inv));
}

// One row of silu(gate) * up, silu rounded to the dtype first as the reference does. float32 rows take the vector
// e^x (simd::exp): the compiler calls glibc's scalar expf per element here, which made this op 5x slower than
// torch's silu at prefill sizes (and ~3 ms of a batch-32 decode step).
template <typename scalar_t>
inline void silu_and_mul_row(const scalar_t* gate, const scalar_t* up, scalar_t* o, int64_t d) {
  int64_t i = 0;
#ifdef HELIOS_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    const simd::Vec one = simd::broadcast(1.f), minus_one = simd::broadcast(-1.f);
    for (; i + simd::kLanes <= d; i += simd::kLanes) {
      const simd::Vec g = simd::load(gate + i);
      const simd::Vec silu = simd::div(g, simd::add(one, simd::exp(simd::mul(g, minus_one))));
      simd::store(o + i, simd::mul(silu, simd::load(up + i)));
    }
  }
#endif
  for (; i < d; ++i) {
    const float g = static_cast<float>(gate[i]);
    o[i] = static_cast<scalar_t>(round_to<scalar_t>(g / (1.f + std::exp(-g))) * static_cast<float>(up[i]));
  }
}

// One head row x [2 * half] rotated in place by table rows c, s (rotate-half / NeoX layout):
// x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x[half:], x[:half]); each product rounded.
template <typename scalar_t>
inline void rotate_row(scalar_t* x, const scalar_t* c, const scalar_t* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + half]);
    const float lo = round_to<scalar_t>(a * static_cast<float>(c[i])) + round_to<scalar_t>(-b * static_cast<float>(s[i]));
    const float hi =
        round_to<scalar_t>(b * static_cast<float>(c[i + half])) + round_to<scalar_t>(a * static_cast<float>(s[i + half]));
    x[i] = static_cast<scalar_t>(lo);
    x[i + half] = static_cast<scalar_t>(hi);
  }
}

}  // namespace helios
