// Host-side KV block allocator: reference-counted blocks, O(1) allocate/free,
// per-sequence append-only block tables. Owns no tensor memory: block ids index
// the KV pool tensors that Python allocates for the loaded layers only.
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
  int64_t num_free() const { return static_cast<int64_t>(free_list_.size()); }

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

 private:
  void check_block(int32_t block) const;

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> free_list_;  // stack: O(1) pop/push
  std::vector<int32_t> ref_counts_;
  std::unordered_map<int64_t, std::vector<int32_t>> tables_;
};

}  // namespace helios
