"""Paged KV cache: fixed-size blocks from one pool, a block table per sequence.

A transformers cache is one padded [batch, heads, max_len, dim] tensor per layer: every sequence
pays for the longest one, and a batch whose members join and leave at every step would have to be
re-padded each time. Here a sequence owns ceil(len / block_size) blocks of a shared pool, so the
only waste is the unfilled tail of its last block (< block_size tokens), and a finished sequence's
blocks serve the next one at once (vLLM's PagedAttention: the attention kernel reads each
sequence's keys through its block table, ops/paged_attention.py).

Admission reserves the blocks a request may ever need (prompt + max_tokens), so a running sequence
never finds the pool empty and nothing has to be preempted; blocks are taken from the reservation
only as the sequence actually grows, so `blocks_used` measures real occupancy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)
    reserved: int = 0  # blocks promised at admission and not taken yet


class PagedKVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)  # row b*block_size+i = token i of block b
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._reserved = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_reserve(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free) - self._reserved

    def reserve(self, tokens: int) -> BlockTable:
        if not self.can_reserve(tokens):
            raise RuntimeError("KV cache full; check can_reserve before admitting")
        table = BlockTable(reserved=self.blocks_for(tokens))
        self._reserved += table.reserved
        return table

    def grow(self, table: BlockTable, length: int) -> None:
        """Give `table` blocks for `length` tokens, out of its reservation."""
        while len(table.blocks) * self.block_size < length:
            if table.reserved == 0:
                raise RuntimeError("sequence grew past its reservation")
            table.blocks.append(self._free.pop())
            table.reserved -= 1
            self._reserved -= 1

    def release(self, table: BlockTable) -> None:
        self._free.extend(reversed(table.blocks))
        self._reserved -= table.reserved
        table.blocks, table.reserved = [], 0

    def rows(self, table: BlockTable, start: int, end: int) -> list[int]:
        """Pool rows holding positions [start, end) of the sequence."""
        size = self.block_size
        return [table.blocks[p // size] * size + p % size for p in range(start, end)]

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def bytes_per_block(self) -> int:
        per_token = self.keys[:, 0].numel() * self.keys.element_size() * 2
        return per_token * self.block_size
