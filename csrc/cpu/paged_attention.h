// Causal attention of one query token over the paged KV cache (online softmax, one cache block at a time), for
// the paged_attention op (cache_ops.cpp) and the fused decode stack (decode_stack.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "simd.h"

namespace helios {

// A layer's caches [num_blocks, block_size, kv_heads, dim]; query head h reads KV head h / group. The cache may be
// held in a narrower type than the queries (float32 queries over a float16 / bfloat16 cache: kv_cache_dtype).
// f(cache_t{}) with cache_t the C++ type of a float32, float16 or bfloat16 cache (the caller has checked it is one).
template <typename F>
void with_cache_type(c10::ScalarType dtype, F&& f) {
  if (dtype == c10::kHalf) return f(c10::Half{});
  if (dtype == c10::kBFloat16) return f(c10::BFloat16{});
  return f(float{});
}

template <typename scalar_t>
struct PagedKV {
  const scalar_t* k;
  const scalar_t* v;
  int64_t block_size, kv_heads, dim, group;
  int64_t slot_stride() const { return kv_heads * dim; }  // elements per cache slot
};

// Per-thread buffers of attend_token, allocated once per chunk of tokens.
struct AttentionScratch {
  int64_t padded_block;  // scores row length: whole vectors, so the vector exp needs no tail
  std::vector<float> q, acc, row, scores, run_max, run_sum;
  AttentionScratch(int64_t heads, int64_t dim, int64_t slot_stride, int64_t block_size)
#ifdef HELIOS_SIMD
      : padded_block((block_size + simd::kLanes - 1) / simd::kLanes * simd::kLanes),
#else
      : padded_block(block_size),
#endif
        q(heads * dim), acc(heads * dim), row(slot_stride), scores(heads * padded_block), run_max(heads),
        run_sum(heads) {
  }
};

// Row of a cache/query tensor as float: fp32 rows are read in place, other dtypes converted into `buf`.
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}
template <>
inline const float* as_float<float>(const float* src, float*, int64_t) {
  return src;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

#ifdef HELIOS_SIMD
// kLanes cache values from p on, as float32.
inline simd::Vec load_cached(const float* p) { return simd::load(p); }
inline simd::Vec load_cached(const c10::Half* p) { return simd::from_half(reinterpret_cast<const uint16_t*>(p)); }
inline simd::Vec load_cached(const c10::BFloat16* p) {
  return simd::from_bfloat16(reinterpret_cast<const uint16_t*>(p));
}

// Accumulator vectors one call of attend_chunk holds in registers (NG heads x DV vectors): half the
// register file; the rest holds a K or V row and the broadcast weights.
#if defined(__AVX512F__)
constexpr int kAccVectors = 16;
#else
constexpr int kAccVectors = 8;
#endif
// Query heads attended together: as many as kAccVectors allows, at most 4 (groups are split into runs of <= 4).
template <int DV>
constexpr int kMaxTogether = std::min(4, std::max(1, kAccVectors / DV));

// One chunk of n <= kLanes cache slots (rows k_rows / v_rows, already offset to the KV head) for NG query heads
// h0 .. h0 + NG - 1 that read that KV head, head_dim = DV whole vectors: each K and V row is loaded (and converted
// from the cache type) once for all NG heads, and the V accumulation runs NG x DV independent chains. Per head, the
// chunk's dot products fold into one vector of scores (simd::transpose_sum) and the online softmax runs on that
// vector; the running max / sum / output of each head live in s (scaled queries in s.q).
template <int DV, int NG, typename cache_t>
void attend_chunk(const cache_t* const* k_rows, const cache_t* const* v_rows, int64_t n, int64_t h0,
                  AttentionScratch& s) {
  constexpr int64_t W = simd::kLanes, dim = DV * W;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const float* q = s.q.data() + h0 * dim;
  float* acc_out = s.acc.data() + h0 * dim;
  simd::Vec part[NG][W], acc[NG][DV];
  alignas(64) float probs[NG][W];
  for (int64_t i = 0; i < n; ++i) {
    simd::Vec k[DV];
#pragma GCC unroll 16
    for (int j = 0; j < DV; ++j) k[j] = load_cached(k_rows[i] + j * W);
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {
      simd::Vec d = simd::mul(simd::load(q + g * dim), k[0]);
#pragma GCC unroll 16
      for (int j = 1; j < DV; ++j) d = simd::fma(simd::load(q + g * dim + j * W), k[j], d);
      part[g][i] = d;
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g) {
    for (int64_t i = n; i < W; ++i) part[g][i] = simd::zero();
    float& run_max = s.run_max[h0 + g];
    const simd::Vec scores = simd::first_or(simd::transpose_sum(part[g]), n, kNegInf);
    const float block_max = std::max(run_max, simd::max_of(scores));
    const simd::Vec p = simd::first_or(simd::exp(simd::add(scores, simd::broadcast(-block_max))), n, 0.f);
    const float correction = std::exp(run_max - block_max);  // 0 before the first chunk (acc is 0 too)
    s.run_sum[h0 + g] = s.run_sum[h0 + g] * correction + simd::sum(p);
    run_max = block_max;
    simd::store(probs[g], p);
#pragma GCC unroll 16
    for (int j = 0; j < DV; ++j) acc[g][j] = simd::mul(simd::load(acc_out + g * dim + j * W), simd::broadcast(correction));
  }
  for (int64_t i = 0; i < n; ++i) {
    simd::Vec v[DV];
#pragma GCC unroll 16
    for (int j = 0; j < DV; ++j) v[j] = load_cached(v_rows[i] + j * W);
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {
      const simd::Vec w = simd::broadcast(probs[g][i]);
#pragma GCC unroll 16
      for (int j = 0; j < DV; ++j) acc[g][j] = simd::fma(w, v[j], acc[g][j]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int j = 0; j < DV; ++j) simd::store(acc_out + g * dim + j * W, acc[g][j]);
}

// attend_chunk<DV, count> for a runtime count in [1, kMaxTogether<DV>].
template <int DV, typename cache_t, int NG = 1>
void attend_chunk_heads(int64_t count, const cache_t* const* k_rows, const cache_t* const* v_rows, int64_t n,
                        int64_t h0, AttentionScratch& s) {
  if constexpr (NG < kMaxTogether<DV>) {
    if (count > NG) return attend_chunk_heads<DV, cache_t, NG + 1>(count, k_rows, v_rows, n, h0, s);
  }
  attend_chunk<DV, NG, cache_t>(k_rows, v_rows, n, h0, s);
}

// attend_token for float32 queries (over a float32, float16 or bfloat16 cache) whose head_dim is DV whole vectors.
// Slots go in chunks of one vector's width, front to back (each slot's rows are read whole, in order); within a
// chunk the heads [h0, h1) go in runs that share a KV head (a GQA group, in runs of at most kMaxTogether<DV>).
template <int DV, typename cache_t>
void attend_token_vectors(const PagedKV<cache_t>& kv, const float* q_src, const int32_t* table, int64_t pos,
                          int64_t window, float scale, int64_t h0, int64_t h1, float* o, AttentionScratch& s) {
  constexpr int64_t W = simd::kLanes, dim = DV * W;
  const int64_t block_size = kv.block_size, group = kv.group, slot_stride = kv.slot_stride();
  const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  for (int64_t i = h0 * dim; i < h1 * dim; ++i) s.q[i] = q_src[i] * scale;
  std::fill(s.acc.begin() + h0 * dim, s.acc.begin() + h1 * dim, 0.f);
  std::fill(s.run_max.begin() + h0, s.run_max.begin() + h1, -std::numeric_limits<float>::infinity());
  std::fill(s.run_sum.begin() + h0, s.run_sum.begin() + h1, 0.f);
  const cache_t* k_rows[W];
  const cache_t* v_rows[W];
  for (int64_t block_start = first - first % block_size; block_start <= pos; block_start += block_size) {
    const int64_t lo = std::max(first, block_start), hi = std::min(pos + 1, block_start + block_size);
    const int64_t base = static_cast<int64_t>(table[block_start / block_size]) * block_size;
    if (block_start + block_size <= pos) {  // the next block's K and V rows, read while this one is computed
      const int64_t next = static_cast<int64_t>(table[block_start / block_size + 1]) * block_size;
      const int64_t bytes = (std::min(pos + 1, block_start + 2 * block_size) - block_start - block_size) *
                            slot_stride * int64_t{sizeof(cache_t)};
      const char* k_next = reinterpret_cast<const char*>(kv.k + next * slot_stride);
      const char* v_next = reinterpret_cast<const char*>(kv.v + next * slot_stride);
      for (int64_t b = 0; b < bytes; b += 64) {
        simd::prefetch(k_next, b);
        simd::prefetch(v_next, b);
      }
    }
    for (int64_t c0 = lo; c0 < hi; c0 += W) {
      const int64_t n = std::min(W, hi - c0);
      for (int64_t h = h0; h < h1;) {
        const int64_t count = std::min<int64_t>(std::min(h1, (h / group + 1) * group) - h, kMaxTogether<DV>);
        const int64_t off = (h / group) * dim;
        for (int64_t i = 0; i < n; ++i) {
          k_rows[i] = kv.k + (base + c0 + i - block_start) * slot_stride + off;
          v_rows[i] = kv.v + (base + c0 + i - block_start) * slot_stride + off;
        }
        attend_chunk_heads<DV, cache_t>(count, k_rows, v_rows, n, h, s);
        h += count;
      }
    }
  }
  for (int64_t h = h0; h < h1; ++h) {
    const float inv = 1.f / s.run_sum[h];
    for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = s.acc[h * dim + d] * inv;
  }
}
#endif

// Query heads [h0, h1) of one token at absolute position pos (its row q_src: heads x dim) attend over positions
// [pos - window + 1 (or 0), pos] of its sequence (block table `table`); results go to o (the token's output row,
// heads x dim; only heads h0..h1-1 are written). No per-call allocation, one pass over K and V.
template <typename scalar_t, typename cache_t>
void attend_token(const PagedKV<cache_t>& kv, const scalar_t* q_src, const int32_t* table, int64_t pos,
                  int64_t window, float scale, int64_t h0, int64_t h1, scalar_t* o, AttentionScratch& s) {
  const int64_t dim = kv.dim, block_size = kv.block_size, group = kv.group, slot_stride = kv.slot_stride();
#ifdef HELIOS_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    switch (dim % simd::kLanes == 0 ? dim / simd::kLanes : 0) {
      case 2: return attend_token_vectors<2, cache_t>(kv, q_src, table, pos, window, scale, h0, h1, o, s);
      case 4: return attend_token_vectors<4, cache_t>(kv, q_src, table, pos, window, scale, h0, h1, o, s);
      case 8: return attend_token_vectors<8, cache_t>(kv, q_src, table, pos, window, scale, h0, h1, o, s);
      case 16: return attend_token_vectors<16, cache_t>(kv, q_src, table, pos, window, scale, h0, h1, o, s);
      case 32: return attend_token_vectors<32, cache_t>(kv, q_src, table, pos, window, scale, h0, h1, o, s);
      default: break;  // other head sizes: the scalar path below
    }
  }
#endif
  const int64_t padded_block = s.padded_block;
  const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  for (int64_t i = h0 * dim; i < h1 * dim; ++i) s.q[i] = static_cast<float>(q_src[i]) * scale;
  std::fill(s.acc.begin() + h0 * dim, s.acc.begin() + h1 * dim, 0.f);
  std::fill(s.run_max.begin() + h0, s.run_max.begin() + h1, -std::numeric_limits<float>::infinity());
  std::fill(s.run_sum.begin() + h0, s.run_sum.begin() + h1, 0.f);
  for (int64_t block_start = first - first % block_size; block_start <= pos; block_start += block_size) {
    const int64_t lo = std::max(first, block_start), hi = std::min(pos + 1, block_start + block_size);
    const int64_t base = static_cast<int64_t>(table[block_start / block_size]) * block_size;
    // scores of this block for every head (head h reads KV head h / group)
    for (int64_t p = lo; p < hi; ++p) {
      const float* k = as_float(kv.k + (base + p - block_start) * slot_stride, s.row.data(), slot_stride);
      for (int64_t h = h0; h < h1; ++h)
        s.scores[h * padded_block + (p - lo)] = dot(s.q.data() + h * dim, k + (h / group) * dim, dim);
    }
    // online softmax update: rescale what was accumulated when the running max grows
    for (int64_t h = h0; h < h1; ++h) {
      float* sc = s.scores.data() + h * padded_block;
      float block_max = s.run_max[h];
      for (int64_t i = 0; i < hi - lo; ++i) block_max = std::max(block_max, sc[i]);
      const float correction = std::exp(s.run_max[h] - block_max);
      if (correction != 1.f) {
        s.run_sum[h] *= correction;
        for (int64_t d = 0; d < dim; ++d) s.acc[h * dim + d] *= correction;
      }
      s.run_max[h] = block_max;
      const int64_t n = hi - lo;
#ifdef HELIOS_SIMD
      // vector exp over whole vectors of the (padded) scores row: lanes past n are computed and never read
      for (int64_t i = 0; i < n; i += simd::kLanes)
        simd::store(sc + i, simd::exp(simd::add(simd::load(sc + i), simd::broadcast(-block_max))));
#else
      for (int64_t i = 0; i < n; ++i) sc[i] = std::exp(sc[i] - block_max);
#endif
      float sum = 0.f;
      for (int64_t i = 0; i < n; ++i) sum += sc[i];
      s.run_sum[h] += sum;
    }
    for (int64_t p = lo; p < hi; ++p) {
      const float* v = as_float(kv.v + (base + p - block_start) * slot_stride, s.row.data(), slot_stride);
      for (int64_t h = h0; h < h1; ++h)
        axpy(s.scores[h * padded_block + (p - lo)], v + (h / group) * dim, s.acc.data() + h * dim, dim);
    }
  }
  for (int64_t h = h0; h < h1; ++h) {
    const float inv = 1.f / s.run_sum[h];
    for (int64_t d = 0; d < dim; ++d) o[h * dim + d] = static_cast<scalar_t>(s.acc[h * dim + d] * inv);
  }
}

}  // namespace helios
