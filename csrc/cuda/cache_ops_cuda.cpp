// Torch glue for the CUDA cache kernels: argument checks, current stream, dispatch registration.
// Compiled only when torch itself has CUDA (see setup.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "cache_kernels.h"

namespace helios {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "helios CUDA ops support float32, float16 and bfloat16, got ", t);
  }
}

void store_kv_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                   const at::Tensor& slot_mapping) {
  check_store_kv_args(key, value, key_cache, value_cache, slot_mapping);
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type(), "store_kv (CUDA): the cache keeps the model's dtype");
  const c10::cuda::CUDAGuard guard(key.device());
  const auto elem = key.element_size();
  TORCH_CHECK(elem == 2 || elem == 4, "store_kv: unsupported element size ", elem);
  check_cuda(cuda::launch_store_kv(key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                                   slot_mapping.data_ptr<int64_t>(), key.size(0), key.size(1) * key.size(2),
                                   key.stride(0), value.stride(0), static_cast<int>(elem),
                                   c10::cuda::getCurrentCUDAStream()),
             "store_kv");
}

void paged_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, double scale, int64_t sliding_window) {
  check_paged_attention_args(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc);
  TORCH_CHECK(query.size(2) <= 256, "paged_attention (CUDA): head_dim > 256 is not supported");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type(),
              "paged_attention (CUDA): the cache keeps the model's dtype");
  const c10::cuda::CUDAGuard guard(query.device());
  check_cuda(cuda::launch_paged_attention(
                 out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                 block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), query_start_loc.data_ptr<int32_t>(),
                 seq_lens.size(0), query.size(0), query.size(1), key_cache.size(2), query.size(2), key_cache.size(1),
                 block_tables.size(1), query.stride(0), static_cast<float>(scale), sliding_window,
                 to_dtype(query.scalar_type()), c10::cuda::getCurrentCUDAStream()),
             "paged_attention");
}

}  // namespace

TORCH_LIBRARY_IMPL(helios, CUDA, m) {
  m.impl("store_kv", &store_kv_cuda);
  m.impl("paged_attention", &paged_attention_cuda);
}

}  // namespace helios
