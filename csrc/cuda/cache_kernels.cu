// CUDA kernels of helios._C. Pure CUDA (see cache_kernels.h); torch glue lives in cache_ops_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "cache_kernels.h"

namespace helios::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxPerLane = kMaxHeadDim / kWarp;
constexpr int kWarps = 4;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename Word>
__global__ void store_kv_kernel(const Word* __restrict__ key, const Word* __restrict__ value,
                                Word* __restrict__ key_cache, Word* __restrict__ value_cache,
                                const int64_t* __restrict__ slot_mapping, int64_t row_words, int64_t key_stride,
                                int64_t value_stride) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;  // padding
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
    key_cache[slot * row_words + i] = key[t * key_stride + i];
    value_cache[slot * row_words + i] = value[t * value_stride + i];
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

template <typename T>
__global__ void paged_attention_kernel(T* __restrict__ out, const T* __restrict__ query,
                                       const T* __restrict__ key_cache, const T* __restrict__ value_cache,
                                       const int32_t* __restrict__ block_tables, const int32_t* __restrict__ seq_lens,
                                       const int32_t* __restrict__ query_start_loc, int64_t num_seqs, int64_t heads,
                                       int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                       int64_t q_stride, float scale, int64_t window) {
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  // Binary search the sequence owning token t.
  int64_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int64_t s = lo;
  const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
  const int64_t pos = seq_lens[s] - q_len + (t - query_start_loc[s]);
  const int64_t first = window > 0 ? max(int64_t(0), pos - window + 1) : 0;
  const int64_t kvh = h / (heads / kv_heads);
  const int32_t* table = block_tables + s * max_blocks;

  float q[kMaxPerLane], acc[kMaxPerLane];
  const int per_lane = (head_dim + kWarp - 1) / kWarp;
  for (int i = 0; i < per_lane; ++i) {
    const int64_t d = lane + i * kWarp;
    q[i] = d < head_dim ? to_float(query[t * q_stride + h * head_dim + d]) * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -FLT_MAX, l = 0.f;  // running max and denominator of this warp
  for (int64_t p = first + warp; p <= pos; p += kWarps) {
    const int64_t slot = static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
    const T* k = key_cache + (slot * kv_heads + kvh) * head_dim;
    const T* v = value_cache + (slot * kv_heads + kvh) * head_dim;
    float partial = 0.f;
    for (int i = 0; i < per_lane; ++i) {
      const int64_t d = lane + i * kWarp;
      if (d < head_dim) partial += q[i] * to_float(k[d]);
    }
    const float score = warp_sum(partial);
    const float m_new = fmaxf(m, score);
    const float correction = __expf(m - m_new), w = __expf(score - m_new);
    l = l * correction + w;
    for (int i = 0; i < per_lane; ++i) {
      const int64_t d = lane + i * kWarp;
      acc[i] = acc[i] * correction + (d < head_dim ? w * to_float(v[d]) : 0.f);
    }
    m = m_new;
  }
  // Merge the warps' partial softmax states.
  __shared__ float s_m[kWarps], s_l[kWarps];
  __shared__ float s_acc[kWarps][kMaxHeadDim];
  if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
  for (int i = 0; i < per_lane; ++i) {
    const int64_t d = lane + i * kWarp;
    if (d < head_dim) s_acc[warp][d] = acc[i];
  }
  __syncthreads();
  if (warp == 0) {
    float m_all = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w]);
    float l_all = 0.f;
    for (int w = 0; w < kWarps; ++w) l_all += s_l[w] * __expf(s_m[w] - m_all);
    for (int i = 0; i < per_lane; ++i) {
      const int64_t d = lane + i * kWarp;
      if (d >= head_dim) continue;
      float o = 0.f;
      for (int w = 0; w < kWarps; ++w) o += s_acc[w][d] * __expf(s_m[w] - m_all);
      out[(t * heads + h) * head_dim + d] = from_float<T>(o / l_all);
    }
  }
}

template <typename T>
cudaError_t launch_attention_typed(void* out, const void* query, const void* key_cache, const void* value_cache,
                                   const int32_t* block_tables, const int32_t* seq_lens, const int32_t* qsl,
                                   int64_t num_seqs, int64_t tokens, int64_t heads, int64_t kv_heads,
                                   int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t q_stride,
                                   float scale, int64_t window, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(heads));
  paged_attention_kernel<T><<<grid, kWarps * kWarp, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(query), static_cast<const T*>(key_cache),
      static_cast<const T*>(value_cache), block_tables, seq_lens, qsl, num_seqs, heads, kv_heads, head_dim,
      block_size, max_blocks, q_stride, scale, window);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_store_kv(const void* key, const void* value, void* key_cache, void* value_cache,
                            const int64_t* slot_mapping, int64_t tokens, int64_t row_elems, int64_t key_token_stride,
                            int64_t value_token_stride, int elem_bytes, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const int threads = static_cast<int>(row_elems < 1024 ? row_elems : 1024);
  if (elem_bytes == 4) {
    store_kv_kernel<uint32_t><<<tokens, threads, 0, stream>>>(
        static_cast<const uint32_t*>(key), static_cast<const uint32_t*>(value), static_cast<uint32_t*>(key_cache),
        static_cast<uint32_t*>(value_cache), slot_mapping, row_elems, key_token_stride, value_token_stride);
  } else if (elem_bytes == 2) {
    store_kv_kernel<uint16_t><<<tokens, threads, 0, stream>>>(
        static_cast<const uint16_t*>(key), static_cast<const uint16_t*>(value), static_cast<uint16_t*>(key_cache),
        static_cast<uint16_t*>(value_cache), slot_mapping, row_elems, key_token_stride, value_token_stride);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_paged_attention(void* out, const void* query, const void* key_cache, const void* value_cache,
                                   const int32_t* block_tables, const int32_t* seq_lens,
                                   const int32_t* query_start_loc, int64_t num_seqs, int64_t tokens, int64_t heads,
                                   int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                   int64_t query_token_stride, float scale, int64_t sliding_window, DType dtype,
                                   cudaStream_t stream) {
  if (head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
#define HELIOS_LAUNCH(T)                                                                                           \
  return launch_attention_typed<T>(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,    \
                                   num_seqs, tokens, heads, kv_heads, head_dim, block_size, max_blocks,            \
                                   query_token_stride, scale, sliding_window, stream)
  switch (dtype) {
    case DType::kFloat32: HELIOS_LAUNCH(float);
    case DType::kFloat16: HELIOS_LAUNCH(__half);
    case DType::kBFloat16: HELIOS_LAUNCH(__nv_bfloat16);
  }
#undef HELIOS_LAUNCH
  return cudaErrorInvalidValue;
}

}  // namespace helios::cuda
