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

// Decoder-layer ops (CPU; see cpu/layer_ops.cpp), each the one-pass form of its torch reference in
// helios/ops/layer_ops.py. x: [..., d] with a contiguous last dimension.
// rms_norm: weight * (x_fp32 * rsqrt(mean(x²) + eps)).to(dtype), Llama's op order.
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
// rotary_embedding: query/key [tokens, heads, head_dim] rotated in place (rotate-half / NeoX layout) by the rows
// cos[positions], sin[positions] of [max_positions, head_dim] tables.
void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos,
                          const at::Tensor& sin);
// silu_and_mul: x = gate | up along the last dimension; returns silu(gate) * up.
at::Tensor silu_and_mul_cpu(const at::Tensor& x);

// Weight-only quantized linears (see cpu/quant_ops.cpp for the tiled layouts): x float32 [..., K] -> [..., N],
// plus optional bias [N] and residual [..., N].
// From integer_dot_rows() to 48 rows, x is rounded per group of 32 and multiplied with integer dot products
// (cpu/integer_dot.h; a build without them multiplies in float32): to int16 (error ~1e-5 of the group's largest
// value), or with round_activations (w8a8 / w4a8) to int8.
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, bool round_activations);
at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& minimum, int64_t out_features, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, bool round_activations);

// Softmax statistics of the LM head's logits per row of x float32 [rows, K], never holding [rows, vocab] (see
// cpu/head_ops.cpp): (argmax token int64, p1, p2, entropy) float32 [rows]. Float32 weight [vocab, K], or helios'
// int8 tiles of a [vocab, K] head.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_stats_cpu(const at::Tensor& x,
                                                                          const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_head_stats_cpu(const at::Tensor& x,
                                                                               const at::Tensor& qweight,
                                                                               const at::Tensor& scale,
                                                                               const at::Tensor& minimum,
                                                                               int64_t vocab,
                                                                               bool round_activations);

// Float32 linear over a plain [N, K] weight (see cpu/linear_ops.cpp): x [..., K] -> [..., N], optional bias [N]
// and residual [..., N].
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual);

// The decode layer stack of a Llama-family model in one parallel region (see cpu/decode_stack.cpp): float32 hidden
// [tokens, d] (one decode token per sequence) through every layer whose weights are listed (weight_bits 32: float32
// weights; 8 / 4: helios' int8 / int4 tiles), K/V stored in the caches; returns the new hidden states.
at::Tensor decode_layers_cpu(const at::Tensor& hidden, const at::Tensor& positions, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases, at::TensorList key_caches,
                             at::TensorList value_caches, const at::Tensor& slot_mapping,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos,
                             const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads, double eps,
                             double scale, at::IntArrayRef sliding_windows, int64_t weight_bits,
                             bool round_activations);

// Timing of the stack's phases (input norm, qkv, attention, o_proj, post norm, gate_up, down): seconds thread 0
// spent [working, waiting at the barrier after it] since the last call, as float64 [7, 2]; resets the sums and
// turns timing on or off.
at::Tensor decode_stack_timing_cpu(bool enable);
// The fewest input rows from which int8/int4 linears round activations per group of 32 (to int16, or int8 for
// w8a8 / w4a8) and use integer dot products (cpu/integer_dot.h), up to 48 rows; 0 where this build has none (no
// AVX-512 VNNI).
int64_t integer_dot_rows_cpu();

// Shared argument checks (same messages on every device). A float16 / bfloat16 cache under float32 keys, values
// and queries passes them (kv_cache_dtype; CPU only).
bool narrower_cache(at::ScalarType values, at::ScalarType cache);
void check_store_kv_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& slot_mapping);
void check_paged_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc);

}  // namespace helios
