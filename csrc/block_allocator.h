// Host-side KV block allocator: reference-counted blocks, O(1) allocate/free,
// per-sequence append-only block tables, and prefix caching: a full block may carry the
// chained hash of its tokens; freed blocks keep it (lazy eviction) in an LRU free queue,
// so a later sequence with the same prefix takes them back instead of recomputing.
// Owns no tensor memory: block ids index the KV pool tensors that Python allocates.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace helios {

class BlockAllocator {
 public:
  BlockAllocator(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free() const { return num_free_; }

  // Raw block operations (ref counted). free() of a block whose count is 0 throws.
  int32_t allocate();
  void incref(int32_t block);
  void free(int32_t block);
  int32_t ref_count(int32_t block) const;

  // Per-sequence block tables.
  // Blocks needed to hold num_tokens for seq (0 when the table already covers them).
  int64_t blocks_needed(int64_t seq_id, int64_t num_tokens) const;
  bool can_hold(int64_t seq_id, int64_t num_tokens) const;
  // Appends blocks until the table covers num_tokens; throws (changing nothing) when too few are free.
  void ensure_capacity(int64_t seq_id, int64_t num_tokens);
  // Releases every block of seq and forgets its table. Unknown seq ids are a no-op.
  void free_sequence(int64_t seq_id);
  bool has_sequence(int64_t seq_id) const { return tables_.count(seq_id) > 0; }
  const std::vector<int32_t>& block_table(int64_t seq_id) const;
  // Cache slot (block * block_size + offset) of every position in [start, end) of seq.
  std::vector<int64_t> slots(int64_t seq_id, int64_t start, int64_t end) const;
  int64_t num_sequences() const { return static_cast<int64_t>(tables_.size()); }

  // Prefix caching. match_prefix gives a sequence without a table the cached blocks of its leading
  // full-block hashes (stopping at the first miss) and returns how many it got.
  int64_t match_prefix(int64_t seq_id, const std::vector<int64_t>& block_hashes);
  // Publishes block `index` of seq's table under `hash` (no-op when the hash is already cached).
  void cache_block(int64_t seq_id, int64_t index, int64_t hash);
  int64_t num_cached_blocks() const { return static_cast<int64_t>(hash_to_block_.size()); }
  void reset_prefix_cache();

 private:
  void check_block(int32_t block) const;
  void push_free(int32_t block, bool front);
  void unlink_free(int32_t block);
  void forget_hash(int32_t block);

  int64_t num_blocks_;
  int64_t block_size_;
  // Intrusive doubly-linked free queue; index num_blocks_ is the sentinel. Allocation takes the front.
  // A freed block without a hash goes to the front (nothing to keep, and its memory is warm); a cached
  // one goes to the back, so cached blocks are evicted least recently freed first.
  std::vector<int32_t> prev_, next_;
  std::vector<bool> in_free_;
  int64_t num_free_ = 0;
  std::vector<int32_t> ref_counts_;
  std::vector<int64_t> block_hash_;
  std::vector<bool> has_hash_;
  std::unordered_map<int64_t, int32_t> hash_to_block_;
  std::unordered_map<int64_t, std::vector<int32_t>> tables_;
};

}  // namespace helios
