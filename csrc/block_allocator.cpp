#include "block_allocator.h"

#include <stdexcept>
#include <string>

namespace helios {

BlockAllocator::BlockAllocator(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks < 0) throw std::invalid_argument("num_blocks must be >= 0, got " + std::to_string(num_blocks));
  if (block_size < 1) throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(block_size));
  free_list_.reserve(num_blocks);
  // Push in reverse so that allocation hands out 0, 1, 2, ... (easier to read in dumps).
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
  ref_counts_.assign(num_blocks, 0);
}

void BlockAllocator::check_block(int32_t block) const {
  if (block < 0 || block >= num_blocks_)
    throw std::out_of_range("block id " + std::to_string(block) + " outside [0, " + std::to_string(num_blocks_) + ")");
}

int32_t BlockAllocator::allocate() {
  if (free_list_.empty()) throw std::runtime_error("out of KV cache blocks");
  int32_t block = free_list_.back();
  free_list_.pop_back();
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
  if (--ref_counts_[block] == 0) free_list_.push_back(block);
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

}  // namespace helios
