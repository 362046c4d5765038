// Register-blocked y = x·Wᵀ (+ bias) (+ residual) for few input rows (decode), over weights seen as tiles of kNR
// output rows. The weight formats (float32 rows, int8/int4 groups; see quant_ops.cpp and linear_ops.cpp) only say
// how a tile's weights are loaded; the blocking, the epilogue and the thread split live here, so that the per-op
// linears and the fused decode stack (decode_stack.cpp) run the very same arithmetic.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace helios::gemm {

using simd::kMR;
constexpr int64_t kNR = 4;       // output rows per tile
constexpr int64_t kSmallM = 48;  // up to here the register-blocked kernels run; more rows are a GEMM library's job

struct Epilogue {
  const float* bias;      // [N] or null
  const float* residual;  // [M, N] or null (may equal out: each element is read before it is written)
  float* out;             // [M, N]
  int64_t N;
  void put(int64_t m, int64_t n, float v) const {
    if (bias) v += bias[n];
    if (residual) v += residual[m * N + n];
    out[m * N + n] = v;
  }
};

// Calls f(std::integral_constant<int, MR>{}) with MR = rows, for rows in 1..kMR (register-blocked kernels are
// instantiated per block height).
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: if constexpr (kMR >= 4) f(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (kMR >= 5) f(std::integral_constant<int, 5>{}); break;
    case 6: if constexpr (kMR >= 6) f(std::integral_constant<int, 6>{}); break;
    default: TORCH_CHECK(false, "with_rows: ", rows, " rows per block");
  }
}

#ifdef HELIOS_SIMD
// MR (1..kMR) input rows of x [M, K] against tile t, its weights loaded (and converted) in registers and never
// stored. Tiles::load(t, j, k) gives weights k..k+kLanes of the tile's row j; with Tiles::kTail, K need not be a
// multiple of kLanes and Tiles::load_tail gives the last partial vector (zeros past K). (The unroll pragmas let GCC
// keep `sum` in registers.)
template <int MR, typename Tiles>
void direct_rows(const float* x, int64_t m0, int64_t t, const Tiles& w, const Epilogue& epi) {
  const int64_t K = w.K;
  const int64_t full = Tiles::kTail ? K - K % simd::kLanes : K;
  simd::Vec sum[MR][kNR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kNR; ++j) sum[i][j] = simd::zero();
  for (int64_t k = 0; k < full; k += simd::kLanes) {
#pragma GCC unroll 4
    for (int j = 0; j < kNR; ++j) {
      const simd::Vec v = w.load(t, j, k);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) sum[i][j] = simd::fma(simd::load(x + (m0 + i) * K + k), v, sum[i][j]);
    }
  }
  if constexpr (Tiles::kTail) {
    if (full < K) {
      const int64_t n = K - full;
#pragma GCC unroll 4
      for (int j = 0; j < kNR; ++j) {
        const simd::Vec v = w.load_tail(t, j, full, n);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i)
          sum[i][j] = simd::fma(simd::load_first(x + (m0 + i) * K + full, n), v, sum[i][j]);
      }
    }
  }
  const int64_t n0 = t * kNR, nr = std::min(kNR, epi.N - n0);
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nr; ++j) epi.put(m0 + i, n0 + j, simd::sum(sum[i][j]));
}
#else
// x[m0 + i]·tile[j] over K for MR input rows and the tile's rows (tile: kNR x K floats), into the output.
template <int MR>
void micro_kernel(const float* x, int64_t m0, const float* tile, int64_t K, int64_t n0, const Epilogue& epi) {
  const int64_t nr = std::min(kNR, epi.N - n0);
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nr; ++j) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += x[(m0 + i) * K + k] * tile[j * K + k];
      epi.put(m0 + i, n0 + j, s);
    }
}
#endif

// Tiles [t_begin, t_end) against all M (<= kSmallM) rows of x, on the calling thread. Without SIMD intrinsics each
// tile is first materialized as kNR x K floats (Tiles::tile: a pointer into the weight, or dequantized into
// `buffer`, which must hold kNR * K floats).
template <typename Tiles>
void tile_range(const float* x, int64_t M, int64_t t_begin, int64_t t_end, const Tiles& w, const Epilogue& epi,
                float* buffer) {
  for (int64_t t = t_begin; t < t_end; ++t) {
#ifdef HELIOS_SIMD
    (void)buffer;
    for (int64_t m0 = 0; m0 < M; m0 += kMR)
      with_rows(std::min(kMR, M - m0), [&](auto mr) { direct_rows<mr.value>(x, m0, t, w, epi); });
#else
    const float* tile = w.tile(t, buffer);
    for (int64_t m0 = 0; m0 < M; m0 += kMR)
      with_rows(std::min(kMR, M - m0), [&](auto mr) { micro_kernel<mr.value>(x, m0, tile, w.K, t * kNR, epi); });
#endif
  }
}

// The same over all tiles, split across torch's intra-op threads.
template <typename Tiles>
void small_gemm(const float* x, int64_t M, int64_t tiles, const Tiles& w, const Epilogue& epi) {
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
#ifdef HELIOS_SIMD
    tile_range(x, M, begin, end, w, epi, nullptr);
#else
    std::vector<float> buffer(kNR * w.K);
    tile_range(x, M, begin, end, w, epi, buffer.data());
#endif
  });
}

// Float32 weights in their checkpoint layout, W [N, K] row-major: tile t is rows t*kNR .. t*kNR+kNR-1. Rows past N
// (the last tile of an N that kNR does not divide) read row N-1 again; the epilogue drops them.
struct FloatRows {
  static constexpr bool kTail = true;
  const float* w;
  int64_t N, K;
  const float* row(int64_t t, int64_t j) const { return w + std::min(t * kNR + j, N - 1) * K; }
#ifdef HELIOS_SIMD
  simd::Vec load(int64_t t, int64_t j, int64_t k) const { return simd::load(row(t, j) + k); }
  simd::Vec load_tail(int64_t t, int64_t j, int64_t k, int64_t n) const { return simd::load_first(row(t, j) + k, n); }
#endif
  const float* tile(int64_t t, float*) const { return w + t * kNR * K; }
};

}  // namespace helios::gemm
