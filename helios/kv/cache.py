"""The KV pool: one tensor [layers, 2, blocks, block_size, kv_heads, head_dim] for the LOADED layers only,
plus the C++ block allocator that hands out its blocks.

Pool size = (memory budget − weights of the loaded layers − activations) / bytes per block, so loading
fewer layers leaves room for more blocks, hence more concurrent sequences.
"""

from __future__ import annotations

import torch

from helios._ext import load_extension


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for_budget(budget: int, weight_bytes: int, activation_bytes: int, bytes_per_token: int,
                      block_size: int) -> int:
    free = budget - weight_bytes - activation_bytes
    return max(0, free // (bytes_per_token * block_size))


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_token = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        # empty, not zeros: a slot is always written (store_kv) before attention reads it.
        self.pool = torch.empty(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                                device=device)
        self.allocator = load_extension().BlockAllocator(num_blocks, block_size)

    @property
    def total_bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[index, 0], self.pool[index, 1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.num_layers)]
