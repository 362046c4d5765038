// CPU implementations of store_kv and paged_attention (at::parallel_for = OpenMP in torch builds).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../ops.h"
#include "paged_attention.h"

namespace helios {

// float32 keys and values (and queries) over a float16 / bfloat16 cache: the kv_cache_dtype option.
bool narrower_cache(at::ScalarType values, at::ScalarType cache) {
  return values == at::kFloat && (cache == at::kHalf || cache == at::kBFloat16);
}

void check_store_kv_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3, "store_kv: key/value must be [tokens, kv_heads, head_dim]");
  TORCH_CHECK(key.sizes() == value.sizes(), "store_kv: key and value shapes differ");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "store_kv: caches must be [num_blocks, block_size, kv_heads, head_dim] of one shape");
  TORCH_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "store_kv: cache heads/head_dim do not match key");
  TORCH_CHECK(key.scalar_type() == value.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
              "store_kv: key and value (and the two caches) must share a dtype");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() ||
                  narrower_cache(key.scalar_type(), key_cache.scalar_type()),
              "store_kv: key/value dtype (", key.scalar_type(), ") must equal the cache dtype (",
              key_cache.scalar_type(), "), or be float32 over a float16 / bfloat16 cache");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "store_kv: caches must be contiguous");
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
                  value.stride(1) == value.size(2),
              "store_kv: each token's key/value rows must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0),
              "store_kv: slot_mapping must be int64 [tokens]");
}

void store_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                  const at::Tensor& slot_mapping) {
  check_store_kv_args(key, value, key_cache, value_cache, slot_mapping);
  // a narrower cache: rounded to its type (ATen's vectorized copy), then stored
  if (key.scalar_type() != key_cache.scalar_type())
    return store_kv_cpu(key.to(key_cache.scalar_type()), value.to(value_cache.scalar_type()), key_cache, value_cache,
                        slot_mapping);
  const int64_t tokens = key.size(0);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t row_bytes = key.size(1) * key.size(2) * key.element_size();
  const auto slot_acc = slot_mapping.contiguous();
  const int64_t* slots = slot_acc.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] < num_slots, "store_kv: slot ", slots[t], " outside the cache (", num_slots, " slots)");
  const char* k_src = static_cast<const char*>(key.data_ptr());
  const char* v_src = static_cast<const char*>(value.data_ptr());
  char* k_dst = static_cast<char*>(key_cache.data_ptr());
  char* v_dst = static_cast<char*>(value_cache.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size();
  const int64_t v_stride = value.stride(0) * value.element_size();
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // padding
      std::memcpy(k_dst + slot * row_bytes, k_src + t * k_stride, row_bytes);
      std::memcpy(v_dst + slot * row_bytes, v_src + t * v_stride, row_bytes);
    }
  });
}

void check_paged_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc) {
  TORCH_CHECK(query.dim() == 3, "paged_attention: query must be [tokens, heads, head_dim]");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() && out.is_contiguous(),
              "paged_attention: out must be a contiguous tensor shaped and typed like query");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2),
              "paged_attention: each query token's heads must be contiguous");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous(),
              "paged_attention: caches must be contiguous [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(key_cache.size(3) == query.size(2), "paged_attention: head_dim of query and cache differ");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "paged_attention: heads must be a multiple of kv_heads");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type() &&
                  (key_cache.scalar_type() == query.scalar_type() ||
                   narrower_cache(query.scalar_type(), key_cache.scalar_type())),
              "paged_attention: the cache dtype (", key_cache.scalar_type(), ") must equal the query's (",
              query.scalar_type(), "), or be float16 / bfloat16 under float32 queries");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "paged_attention: block_tables must be contiguous int32 [seqs, max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == block_tables.size(0),
              "paged_attention: seq_lens must be int32 [seqs]");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.dim() == 1 &&
                  query_start_loc.size(0) == seq_lens.size(0) + 1,
              "paged_attention: query_start_loc must be int32 [seqs + 1]");
}

namespace {

template <typename scalar_t, typename cache_t>
void paged_attention_impl(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const int32_t* tables, int64_t max_blocks,
                          const int32_t* seq_lens, const int32_t* qsl, int64_t num_seqs, float scale,
                          int64_t window) {
  const int64_t tokens = query.size(0), heads = query.size(1), dim = query.size(2);
  const PagedKV<cache_t> kv{key_cache.data_ptr<cache_t>(), value_cache.data_ptr<cache_t>(), key_cache.size(1),
                            key_cache.size(2), dim, heads / key_cache.size(2)};
  const int64_t q_stride = query.stride(0);
  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  scalar_t* o_ptr = out.data_ptr<scalar_t>();

  // token -> sequence, so that work splits by token and long prefills still spread over cores.
  std::vector<int64_t> token_seq(tokens, -1);
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t t = qsl[s]; t < qsl[s + 1]; ++t) token_seq[t] = s;

  // One task = one query token, all its heads: each cache slot (every KV head's row, contiguous) is read once per
  // token, front to back. (Tasks of one KV head each read 1/kv_heads of every slot at a stride, which ran 3x slower
  // inside the engine than in isolation: there the cache is cold and the strided reads defeat the prefetcher.)
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch scratch(heads, dim, kv.slot_stride(), kv.block_size);  // reused by every task of this chunk
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = token_seq[t];
      if (s < 0) continue;
      const int64_t q_len = qsl[s + 1] - qsl[s];
      const int64_t pos = seq_lens[s] - q_len + (t - qsl[s]);  // absolute position of this query token
      attend_token(kv, q_ptr + t * q_stride, tables + s * max_blocks, pos, window, scale, 0, heads,
                   o_ptr + t * heads * dim, scratch);
    }
  });
}

}  // namespace

void paged_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t sliding_window) {
  check_paged_attention_args(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc);
  const int64_t num_seqs = seq_lens.size(0);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(qsl[0] == 0 && qsl[num_seqs] == query.size(0), "paged_attention: query_start_loc must span all tokens");
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    TORCH_CHECK(q_len >= 0 && lens[s] >= q_len, "paged_attention: sequence ", s, " has ", q_len,
                " query tokens but context length ", lens[s]);
    TORCH_CHECK(lens[s] <= max_blocks * key_cache.size(1), "paged_attention: sequence ", s,
                " is longer than its block table");
  }
  auto run = [&](auto query_type, auto cache_type) {
    paged_attention_impl<decltype(query_type), decltype(cache_type)>(
        out, query, key_cache, value_cache, block_tables.data_ptr<int32_t>(), max_blocks, lens, qsl, num_seqs,
        static_cast<float>(scale), sliding_window);
  };
  if (query.scalar_type() == at::kFloat)  // over a float32 cache, or a narrower one (kv_cache_dtype)
    return with_cache_type(key_cache.scalar_type(), [&](auto cache_type) { run(float{}, cache_type); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_cpu",
                                  [&] { run(scalar_t{}, scalar_t{}); });
}

}  // namespace helios
