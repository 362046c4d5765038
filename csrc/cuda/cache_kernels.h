// Launchers of the CUDA cache kernels. Raw pointers + stream only: no torch headers, so the .cu
// compiles in about a second with plain nvcc (CI compile-checks it on machines without a GPU).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace helios::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Copies each token's [kv_heads * head_dim] key/value row to its slot; slot < 0 is skipped.
cudaError_t launch_store_kv(const void* key, const void* value, void* key_cache, void* value_cache,
                            const int64_t* slot_mapping, int64_t tokens, int64_t row_elems, int64_t key_token_stride,
                            int64_t value_token_stride, int elem_bytes, cudaStream_t stream);

// Varlen causal paged attention (same contract as the CPU op). One block per (token, head);
// warps split the context, lanes split head_dim, online softmax merged across warps.
cudaError_t launch_paged_attention(void* out, const void* query, const void* key_cache, const void* value_cache,
                                   const int32_t* block_tables, const int32_t* seq_lens,
                                   const int32_t* query_start_loc, int64_t num_seqs, int64_t tokens, int64_t heads,
                                   int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                   int64_t query_token_stride, float scale, int64_t sliding_window, DType dtype,
                                   cudaStream_t stream);

}  // namespace helios::cuda
