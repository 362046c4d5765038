"""Chained content hashes of full KV blocks, the keys of the prefix cache.

hash(block i) = H(hash(block i-1) ‖ token ids of block i): equal hashes mean equal whole prefixes, so a
hit on block i implies hits on blocks 0..i-1 (vLLM and nano-vllm key their prefix caches the same way).
"""

from __future__ import annotations

import hashlib
from array import array


def block_hash(parent: int, tokens: list[int]) -> int:
    digest = hashlib.blake2b(parent.to_bytes(8, "little", signed=True) + array("q", tokens).tobytes(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def extend_hashes(hashes: list[int], token_ids: list[int], block_size: int, num_blocks: int) -> list[int]:
    """Grows `hashes` (in place) to the first num_blocks full blocks of token_ids and returns them."""
    while len(hashes) < num_blocks:
        i = len(hashes)
        hashes.append(block_hash(hashes[-1] if hashes else 0, token_ids[i * block_size:(i + 1) * block_size]))
    return hashes[:num_blocks]
