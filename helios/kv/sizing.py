"""How many KV blocks the pool gets, and why: from settings, never from how much page cache happens to be free.

kv_cache_blocks wins; else memory_budget (or, on CUDA, gpu_memory_utilization x GPU memory, default 0.9) covers
weights + activations + KV. On CPU the default is a fixed 4 GiB of KV (vLLM's CPU default), lowered only when a
quarter of the memory this process can get (MemAvailable, which counts reclaimable page cache, and the cgroup
limit) is smaller: a machine's busy page cache does not change it.
"""

from __future__ import annotations

import torch

from helios.kv.cache import blocks_for_budget
from helios.utils.memory import available_host_memory, device_total_memory, format_bytes

CPU_DEFAULT_KV_BYTES = 4 * 2**30
CUDA_DEFAULT_UTILIZATION = 0.9


def kv_pool_blocks(*, device: torch.device, weight_bytes: int, activation_bytes: int, bytes_per_token: int,
                   block_size: int, kv_cache_blocks: int | None, memory_budget: int | None,
                   gpu_memory_utilization: float | None, loaded_layers: int) -> tuple[int, str]:
    """(blocks, the reason in words) for a pool of blocks of `block_size` tokens."""
    if kv_cache_blocks is not None:
        return kv_cache_blocks, f"kv_cache_blocks={kv_cache_blocks} (set)"
    if gpu_memory_utilization is not None and device.type != "cuda":
        raise ValueError("gpu_memory_utilization applies to CUDA devices; on CPU size the pool with memory_budget "
                         "(bytes for weights + activations + KV) or kv_cache_blocks")
    used = weight_bytes + activation_bytes
    if memory_budget is not None:
        budget, reason = memory_budget, f"memory_budget={format_bytes(memory_budget)}"
    elif device.type == "cuda":
        share = gpu_memory_utilization or CUDA_DEFAULT_UTILIZATION
        total = device_total_memory(device)
        budget = int(share * total)
        reason = f"gpu_memory_utilization={share} x {format_bytes(total)} of GPU memory"
    else:
        kv = CPU_DEFAULT_KV_BYTES
        reason = f"CPU default: {format_bytes(kv)} of KV (set memory_budget or kv_cache_blocks to change it)"
        quarter = available_host_memory() // 4
        if quarter < kv:
            kv = quarter
            reason = f"CPU default lowered to a quarter of the {format_bytes(4 * quarter)} of memory available"
        budget = used + kv
    if budget <= used:
        raise ValueError(f"{reason} does not cover the weights of {loaded_layers} layers "
                         f"({format_bytes(weight_bytes)}) plus activations ({format_bytes(activation_bytes)})")
    blocks = blocks_for_budget(budget, weight_bytes, activation_bytes, bytes_per_token, block_size)
    if memory_budget is not None or device.type == "cuda":
        reason += (f", minus weights {format_bytes(weight_bytes)} and activations {format_bytes(activation_bytes)},"
                   f" leaves {format_bytes(budget - used)} for KV")
    return blocks, f"{reason}: {blocks} blocks of {block_size} tokens x {bytes_per_token} bytes per token"
