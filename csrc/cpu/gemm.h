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
#include <utility>
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
  // Out rows m0..m0+rows-1, columns n0..n0+valid-1 from a block computed transposed (block[r * stride + m]), written
  // row by row: column by column, every element went to another output row (N floats apart), and where N * 4 bytes
  // is a multiple of 4 KiB (gate_up's 3072) all those rows share one L1 set, so each store missed (1.3x the time of
  // a whole wide gate_up call at 32 rows).
  void put_transposed(int64_t m0, int64_t rows, int64_t n0, int64_t valid, const float* block, int64_t stride) const {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t r = 0; r < valid; ++r) put(m0 + m, n0 + r, block[r * stride + m]);
  }
};

// Calls f(std::integral_constant<int, I>{}) with I = n, for n in 1..Max (register-blocked kernels are instantiated
// per block size).
template <int Max, int I = 1, typename F>
void with_count(int64_t n, F&& f) {
  if constexpr (I <= Max) {
    if (n == I) return f(std::integral_constant<int, I>{});
    return with_count<Max, I + 1>(n, std::forward<F>(f));
  } else {
    TORCH_CHECK(false, "with_count: ", n, " is outside 1..", Max);
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
    // The next tile's weights at k are asked for now, and this tile's kNR weight vectors are loaded before any
    // arithmetic: left to the hardware prefetcher, with the loads spread among the FMAs, the weight streams fell
    // behind the arithmetic of 2-15 rows (8 rows of a gate_up read 15 GB/s from memory; like this, 22 GB/s).
    w.prefetch_next(t, k);
    if constexpr (kMR * kNR + kNR + 1 <= 32) {  // AVX-512: 24 sums + 4 weights + 1 input of 32 registers
      simd::Vec v[kNR];
#pragma GCC unroll 4
      for (int j = 0; j < kNR; ++j) v[j] = w.load(t, j, k);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const simd::Vec xv = simd::load(x + (m0 + i) * K + k);
#pragma GCC unroll 4
        for (int j = 0; j < kNR; ++j) sum[i][j] = simd::fma(xv, v[j], sum[i][j]);
      }
    } else {  // AVX2's 16 registers: one weight vector at a time
#pragma GCC unroll 4
      for (int j = 0; j < kNR; ++j) {
        const simd::Vec v = w.load(t, j, k);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) sum[i][j] = simd::fma(simd::load(x + (m0 + i) * K + k), v, sum[i][j]);
      }
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

#ifdef HELIOS_SIMD
// Wide batches (M >= kWideRows): the register-blocked dot products above reload every tile once per kMR input rows
// and end each output in a horizontal sum, which costs a quarter of the arithmetic at M = 32. Here the batch is the
// vector dimension instead: x is transposed once per call (xt [K, Mp], rows padded to whole vectors with zeros) and
// each weight is broadcast against a vector of input rows, so a block of NR output rows x MV vectors of input rows
// accumulates in registers over all of K with no reduction, reading each weight once per call (quantized weights are
// dequantized once per call, not once per kMR rows).
constexpr int64_t kWideRows = simd::kLanes == 16 ? 16 : 8;  // from this many rows the wide kernel runs
constexpr int kWideVectors = static_cast<int>(kSmallM / simd::kLanes);  // MV: input-row vectors per block
// Output rows per block for MV vectors: accumulators NR x MV fill the registers (24 of AVX-512's 32, 12 of AVX2's 16)
// but NR stays at most 12, so the broadcast addresses (NR row offsets) fit the general-purpose registers.
template <int MV>
constexpr int kWideOut = std::min(12, (simd::kLanes == 16 ? 24 : 12) / MV);

constexpr int64_t kPrefetch = 64;  // floats ahead in each weight row that wide_block asks the cache for

// Out rows n0..n0+NR-1 (rows past `valid` are padding, never written) = xt[:, m0 : m0 + MV*kLanes]ᵀ against the
// weight rows w[r * K : (r + 1) * K].
template <int MV>
void wide_block(const float* xt, int64_t Mp, int64_t m0, int64_t rows, const float* w, int64_t K, int64_t n0,
                int64_t valid, const Epilogue& epi) {
  constexpr int NR = kWideOut<MV>;
  simd::Vec acc[NR][MV];
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 6
    for (int v = 0; v < MV; ++v) acc[r][v] = simd::zero();
  for (int64_t k = 0; k < K; ++k) {
    if (k % 16 == 0) {
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r) __builtin_prefetch(w + r * K + k + kPrefetch, 0, 3);
    }
    const float* xk = xt + k * Mp + m0;
    simd::Vec xv[MV];
#pragma GCC unroll 6
    for (int v = 0; v < MV; ++v) xv[v] = simd::load(xk + v * simd::kLanes);
    const float* wk = w + k;
#pragma GCC unroll 12
    for (int r = 0; r < NR; ++r) {
      const simd::Vec b = simd::broadcast(wk[r * K]);
#pragma GCC unroll 6
      for (int v = 0; v < MV; ++v) acc[r][v] = simd::fma(b, xv[v], acc[r][v]);
    }
  }
  alignas(64) float out[NR][MV * simd::kLanes];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) simd::store(&out[r][v * simd::kLanes], acc[r][v]);
  epi.put_transposed(m0, rows, n0, valid, &out[0][0], MV * simd::kLanes);
}

// Per-thread buffers of the wide kernel (grown, never shrunk: no allocation per call once warm).
struct WideScratch {
  std::vector<float> xt, rows;
};
inline WideScratch& wide_scratch() {
  thread_local WideScratch scratch;
  return scratch;
}

inline int64_t padded_rows(int64_t M) { return (M + simd::kLanes - 1) / simd::kLanes * simd::kLanes; }

// xt [K, padded_rows(M)] = x [M, K] transposed, zero columns after M: the wide kernel's view of the input.
inline void transpose_rows(const float* x, int64_t M, int64_t K, float* xt) {
  const int64_t Mp = padded_rows(M);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t m = 0; m < M; ++m) xt[k * Mp + m] = x[m * K + k];
    for (int64_t m = M; m < Mp; ++m) xt[k * Mp + m] = 0.f;
  }
}

// Output rows of tiles [t_begin, t_end) for all M rows of the input, given transposed (transpose_rows), on the
// calling thread.
template <typename Tiles>
void wide_range(const float* xt, int64_t M, int64_t t_begin, int64_t t_end, const Tiles& w, const Epilogue& epi) {
  const int64_t K = w.K, Mp = padded_rows(M);
  WideScratch& s = wide_scratch();
  const int64_t n_begin = t_begin * kNR, n_end = std::min(t_end * kNR, epi.N);
  const int64_t block = kWideVectors * simd::kLanes;
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    with_count<kWideVectors>((rows + simd::kLanes - 1) / simd::kLanes, [&](auto mv) {
      constexpr int NR = kWideOut<mv.value>;
      if (static_cast<int64_t>(s.rows.size()) < NR * K) s.rows.resize(NR * K);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
        const int64_t valid = std::min<int64_t>(NR, n_end - n0);
        const float* rows_w = w.rows(n0, valid, NR, s.rows.data());
        wide_block<mv.value>(xt, Mp, m0, rows, rows_w, K, n0, valid, epi);
      }
    });
  }
}
#endif

// x [M, K] prepared once for several tile_range calls over the same rows: transposed when the wide kernel will take
// it, else empty (tile_range then reads x itself).
inline std::vector<float> prepared_rows(const float* x, int64_t M, int64_t K) {
#ifdef HELIOS_SIMD
  if (M >= kWideRows) {
    std::vector<float> xt(K * padded_rows(M));
    transpose_rows(x, M, K, xt.data());
    return xt;
  }
#endif
  (void)x, (void)M, (void)K;
  return {};
}

// Tiles [t_begin, t_end) against all M (<= kSmallM) rows of x, on the calling thread. Without SIMD intrinsics each
// tile is first materialized as kNR x K floats (Tiles::tile: a pointer into the weight, or dequantized into
// `buffer`, which must hold kNR * K floats). `prepared` is prepared_rows(x, M, K) when the caller has it (null:
// the wide kernel transposes x itself).
template <typename Tiles>
void tile_range(const float* x, int64_t M, int64_t t_begin, int64_t t_end, const Tiles& w, const Epilogue& epi,
                float* buffer, const float* prepared = nullptr) {
#ifdef HELIOS_SIMD
  // int8/int4 weights with integer dot products: x rounded per group (integer_dot.h)
  if constexpr (Tiles::kIntegerDot) {
    if (w.integer_dot() && M >= Tiles::kIntegerRows) return w.integer_range(x, M, t_begin, t_end, epi);
  }
  if (M >= kWideRows) {
    if (prepared == nullptr) {
      std::vector<float>& xt = wide_scratch().xt;
      if (static_cast<int64_t>(xt.size()) < w.K * padded_rows(M)) xt.resize(w.K * padded_rows(M));
      transpose_rows(x, M, w.K, xt.data());
      prepared = xt.data();
    }
    return wide_range(prepared, M, t_begin, t_end, w, epi);
  }
#endif
  (void)prepared;
  for (int64_t t = t_begin; t < t_end; ++t) {
#ifdef HELIOS_SIMD
    (void)buffer;
    for (int64_t m0 = 0; m0 < M; m0 += kMR)
      with_count<kMR>(std::min(kMR, M - m0), [&](auto mr) { direct_rows<mr.value>(x, m0, t, w, epi); });
#else
    const float* tile = w.tile(t, buffer);
    for (int64_t m0 = 0; m0 < M; m0 += kMR)
      with_count<kMR>(std::min(kMR, M - m0), [&](auto mr) { micro_kernel<mr.value>(x, m0, tile, w.K, t * kNR, epi); });
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
  static constexpr bool kIntegerDot = false;  // wide batches: float32 products (see quant::GroupTiles)
  const float* w;
  int64_t N, K;
  const float* row(int64_t t, int64_t j) const { return w + std::min(t * kNR + j, N - 1) * K; }
#ifdef HELIOS_SIMD
  simd::Vec load(int64_t t, int64_t j, int64_t k) const { return simd::load(row(t, j) + k); }
  simd::Vec load_tail(int64_t t, int64_t j, int64_t k, int64_t n) const { return simd::load_first(row(t, j) + k, n); }
  // The cache line of each row of tile t + 1 at k (see simd::prefetch; past the last tile, bytes after the weight).
  void prefetch_next(int64_t t, int64_t k) const {
#pragma GCC unroll 4
    for (int64_t j = 0; j < kNR; ++j) simd::prefetch(w, ((t + 1) * kNR + j) * K + k);
  }
#endif
  const float* tile(int64_t t, float*) const { return w + t * kNR * K; }
  // The n output rows from tile t0 on, as a weight of their own.
  FloatRows slice(int64_t t0, int64_t n) const { return {w + t0 * kNR * K, n, K}; }
  // `total` rows of K floats from output row n0 on, of which the first `valid` are rows n0.. (the rest padding):
  // in place when they lie inside the weight, else copied into buffer (total * K floats) with zeros after.
  const float* rows(int64_t n0, int64_t valid, int64_t total, float* buffer) const {
    if (n0 + total <= N) return w + n0 * K;
    std::copy(w + n0 * K, w + (n0 + valid) * K, buffer);
    std::fill(buffer + valid * K, buffer + total * K, 0.f);
    return buffer;
  }
};

}  // namespace helios::gemm
