// Tensor ops of helios._C (schemas in bindings.cpp). Same names and contracts on CPU and CUDA.
#pragma once

#include <torch/library.h>

#include <tuple>

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

// Exit tuning, row-wise over contiguous float32 [rows, vocab] logits (CPU; see cpu/softmax_ops.cpp).
// softmax_rows_: logits become probabilities in place; returns (Σ p log p, argmax) per row.
std::tuple<at::Tensor, at::Tensor> softmax_rows_cpu(at::Tensor& logits);
// distill_rows_: student logits z against teacher probs p and target ids; returns per row
// (−Σ p log q, −log q[target], argmax z) with q = softmax(z); with write_grad, z becomes
// grad_scale·((1 + ce_weight)·q − p − ce_weight·onehot(target)), the gradient of KL + ce_weight·CE.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_rows_cpu(at::Tensor& logits, const at::Tensor& probs,
                                                                 const at::Tensor& target, double ce_weight,
                                                                 double grad_scale, bool write_grad);

// Shared argument checks (same messages on every device).
void check_store_kv_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& slot_mapping);
void check_paged_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc);

}  // namespace helios
