// Tensor ops of helios._C (schemas in bindings.cpp). Same names and contracts on CPU and CUDA.
#pragma once

#include <torch/library.h>

namespace helios {

// key/value: [tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim];
// slot_mapping: int64 [tokens], -1 = skip (padding).
void store_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                  const at::Tensor& slot_mapping);

// Varlen causal attention over the paged cache, for prefill, decode and mixed steps.
// query: [tokens, heads, head_dim] (tokens of sequence s are query_start_loc[s]..query_start_loc[s+1]);
// seq_lens[s] = context length including the new tokens, already stored in the cache;
// block_tables: int32 [seqs, max_blocks]; sliding_window <= 0 means none. Writes out [tokens, heads, head_dim].
void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t sliding_window);

// Shared argument checks (same messages on every device).
void check_store_kv_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& slot_mapping);
void check_paged_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc);

}  // namespace helios
