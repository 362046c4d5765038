// Causal attention of one query token over the paged KV cache (online softmax, one cache block at a time), for
// the paged_attention op (cache_ops.cpp) and the fused decode stack (decode_stack.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace helios {

// A layer's caches [num_blocks, block_size, kv_heads, dim]; query head h reads KV head h / group.
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

// Query heads [h0, h1) of one token at absolute position pos (its row q_src: heads x dim) attend over positions
// [pos - window + 1 (or 0), pos] of its sequence (block table `table`); results go to o (the token's output row,
// heads x dim; only heads h0..h1-1 are written). No per-call allocation, one pass over K and V.
template <typename scalar_t>
void attend_token(const PagedKV<scalar_t>& kv, const scalar_t* q_src, const int32_t* table, int64_t pos,
                  int64_t window, float scale, int64_t h0, int64_t h1, scalar_t* o, AttentionScratch& s) {
  const int64_t dim = kv.dim, block_size = kv.block_size, group = kv.group, slot_stride = kv.slot_stride();
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
