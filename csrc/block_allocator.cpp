#include "block_allocator.h"

#include <stdexcept>
#include <string>

namespace helios {

BlockAllocator::BlockAllocator(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks < 0) throw std::invalid_argument("num_blocks must be >= 0, got " + std::to_string(num_blocks));
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(block_size));
  const int32_t sentinel = static_cast<int32_t>(num_blocks);
  prev_.assign(num_blocks + 1, sentinel);
  next_.assign(num_blocks + 1, sentinel);
  in_free_.assign(num_blocks, false);
  ref_counts_.assign(num_blocks, 0);
  block_hash_.assign(num_blocks, 0);
  has_hash_.assign(num_blocks, false);
  for (int64_t b = 0; b < num_blocks; ++b) push_free(static_cast<int32_t>(b), false);  // hands out 0, 1, 2, ...
}

void BlockAllocator::push_free(int32_t block, bool front) {
  const int32_t sentinel = static_cast<int32_t>(num_blocks_);
  const int32_t before = front ? sentinel : prev_[sentinel];
  const int32_t after = next_[before];
  next_[before] = block;
  prev_[block] = before;
  next_[block] = after;
  prev_[after] = block;
  in_free_[block] = true;
  ++num_free_;
}

void BlockAllocator::unlink_free(int32_t block) {
  next_[prev_[block]] = next_[block];
  prev_[next_[block]] = prev_[block];
  in_free_[block] = false;
  --num_free_;
}

void BlockAllocator::forget_hash(int32_t block) {
  if (!has_hash_[block]) return;
  auto it = hash_to_block_.find(block_hash_[block]);
  if (it != hash_to_block_.end() && it->second == block) hash_to_block_.erase(it);
  has_hash_[block] = false;
}

void BlockAllocator::check_block(int32_t block) const {
  if (block < 0 || block >= num_blocks_)
    throw std::out_of_range("block id " + std::to_string(block) + " outside [0, " + std::to_string(num_blocks_) + ")");
}

int32_t BlockAllocator::allocate() {
  if (num_free_ == 0) throw std::runtime_error("out of KV cache blocks");
  const int32_t block = next_[num_blocks_];
  unlink_free(block);
  forget_hash(block);  // evict: its old contents are about to be overwritten
  ref_counts_[block] = 1;
  return block;
}

void BlockAllocator::incref(int32_t block) {
  check_block(block);
  if (ref_counts_[block] == 0) throw std::runtime_error("incref of free block " + std::to_string(block));
  ++ref_counts_[block];
}

void BlockAllocator::free(int32_t block) {
  check_block(block);
  if (ref_counts_[block] == 0) throw std::runtime_error("double free of block " + std::to_string(block));
  if (--ref_counts_[block] == 0) push_free(block, /*front=*/!has_hash_[block]);
}

int32_t BlockAllocator::ref_count(int32_t block) const {
  check_block(block);
  return ref_counts_[block];
}

int64_t BlockAllocator::blocks_needed(int64_t seq_id, int64_t num_tokens) const {
  int64_t want = (num_tokens + block_size_ - 1) / block_size_;
  auto it = tables_.find(seq_id);
  int64_t have = it == tables_.end() ? 0 : static_cast<int64_t>(it->second.size());
  return want > have ? want - have : 0;
}

bool BlockAllocator::can_hold(int64_t seq_id, int64_t num_tokens) const {
  return blocks_needed(seq_id, num_tokens) <= num_free();
}

void BlockAllocator::ensure_capacity(int64_t seq_id, int64_t num_tokens) {
  int64_t need = blocks_needed(seq_id, num_tokens);
  if (need > num_free())
    throw std::runtime_error("sequence " + std::to_string(seq_id) + " needs " + std::to_string(need) +
                             " more KV blocks, only " + std::to_string(num_free()) + " free");
  auto& table = tables_[seq_id];
  for (int64_t i = 0; i < need; ++i) table.push_back(allocate());
}

void BlockAllocator::free_sequence(int64_t seq_id) {
  auto it = tables_.find(seq_id);
  if (it == tables_.end()) return;
  for (int32_t block : it->second) free(block);
  tables_.erase(it);
}

const std::vector<int32_t>& BlockAllocator::block_table(int64_t seq_id) const {
  static const std::vector<int32_t> empty;
  auto it = tables_.find(seq_id);
  return it == tables_.end() ? empty : it->second;
}

std::vector<int64_t> BlockAllocator::slots(int64_t seq_id, int64_t start, int64_t end) const {
  const auto& table = block_table(seq_id);
  if (start < 0 || end < start || end > static_cast<int64_t>(table.size()) * block_size_)
    throw std::out_of_range("positions [" + std::to_string(start) + ", " + std::to_string(end) +
                            ") not covered by the block table of sequence " + std::to_string(seq_id));
  std::vector<int64_t> out;
  out.reserve(end - start);
  for (int64_t pos = start; pos < end; ++pos)
    out.push_back(static_cast<int64_t>(table[pos / block_size_]) * block_size_ + pos % block_size_);
  return out;
}

int64_t BlockAllocator::match_prefix(int64_t seq_id, const std::vector<int64_t>& block_hashes) {
  if (tables_.count(seq_id) && !tables_[seq_id].empty())
    throw std::runtime_error("match_prefix: sequence " + std::to_string(seq_id) + " already has blocks");
  auto& table = tables_[seq_id];
  for (int64_t h : block_hashes) {
    auto it = hash_to_block_.find(h);
    if (it == hash_to_block_.end()) break;
    const int32_t block = it->second;
    if (ref_counts_[block] == 0) unlink_free(block);
    ++ref_counts_[block];
    table.push_back(block);
  }
  if (table.empty()) tables_.erase(seq_id);
  return static_cast<int64_t>(block_hashes.empty() ? 0 : block_table(seq_id).size());
}

void BlockAllocator::cache_block(int64_t seq_id, int64_t index, int64_t hash) {
  const auto& table = block_table(seq_id);
  if (index < 0 || index >= static_cast<int64_t>(table.size()))
    throw std::out_of_range("cache_block: sequence " + std::to_string(seq_id) + " has no block " +
                            std::to_string(index));
  const int32_t block = table[index];
  if (has_hash_[block] || hash_to_block_.count(hash)) return;
  block_hash_[block] = hash;
  has_hash_[block] = true;
  hash_to_block_[hash] = block;
}

void BlockAllocator::reset_prefix_cache() {
  hash_to_block_.clear();
  has_hash_.assign(num_blocks_, false);
}

}  // namespace helios
