"""Attention over a paged KV cache for a packed step: the public entry point and its reference.

    out = paged_attention(q, keys, values, block_tables, row_sequence, row_position, block_size, scale,
                          window=None, softcap=None)

A step packs the new tokens of many sequences side by side (decode rows and prefill chunks). Row
i belongs to sequence row_sequence[i] at position row_position[i] and attends, causally, to that
sequence's positions 0..row_position[i], whose keys and values sit in the pool rows its block table
names (position p is row block_tables[s, p // block_size] * block_size + p % block_size). The
current rows' own keys must already be written. A sliding-window layer (`window` = W, Mistral,
Gemma's local layers) sees only its last W positions, row_position[i] - W < p; Gemma 2 soft-caps
the scores, score = softcap * tanh(score / softcap), before the softmax.

On a CUDA fp16/bf16 tensor with Triton it runs the Triton kernels (`paged_attention_triton.py`):
a program per row, or, given a `QuerySplit` (built on the host from the step's layout), a program
per tile of a prefill chunk's rows as well; otherwise this file's reference: one SDPA call per
sequence over its gathered keys, which defines what the kernels compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE_ROWS = 64  # query rows of one prefill tile (the tile kernel's BLOCK_M)


@dataclass(frozen=True)
class QuerySplit:
    """The rows of a packed step as the attention kernels take them: runs of two or more rows of one
    sequence at consecutive positions (prefill chunks) cut into tiles, and every other row alone."""

    rows: torch.Tensor  # int32 [R]: rows attended one at a time (decode rows)
    tiles: torch.Tensor  # int32 [Q, 2]: (first row, row count <= TILE_ROWS)

    def to(self, device: torch.device) -> QuerySplit:
        return QuerySplit(self.rows.to(device, non_blocking=True), self.tiles.to(device, non_blocking=True))


def query_split(row_sequence: torch.Tensor, row_position: torch.Tensor) -> QuerySplit | None:
    """The split of a step from host copies of its row layout, in tiles of TILE_ROWS (the tile
    kernel's height); None when no run has two rows (a decode step: the row kernel takes every row)."""
    sequence, position = row_sequence.long(), row_position.long()
    continues = (sequence[1:] == sequence[:-1]) & (position[1:] == position[:-1] + 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (~continues).nonzero().flatten() + 1]).tolist()
    rows, tiles = [], []
    for start, end in zip(starts, starts[1:] + [sequence.numel()]):
        if end - start == 1:
            rows.append(start)
        else:
            tiles += [(first, min(TILE_ROWS, end - first)) for first in range(start, end, TILE_ROWS)]
    if not tiles:
        return None
    return QuerySplit(torch.tensor(rows, dtype=torch.int32), torch.tensor(tiles, dtype=torch.int32))


def paged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    row_sequence: torch.Tensor,
    row_position: torch.Tensor,
    block_size: int,
    scale: float,
    split: QuerySplit | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """out [T, H, D] in q's dtype for q [T, H, D], keys/values [pool rows, kv_heads, D] (one layer),
    block_tables int [S, max_blocks], row_sequence / row_position int [T]. H must be a multiple of
    kv_heads (grouped-query attention). `split` (`query_split` of this layout, on q's device) lets
    the Triton path run prefill chunks as tiles; the result is the same function either way."""
    if q.shape[1] % keys.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {keys.shape[1]} key/value heads")
    from bitdelta.kernels import on_triton

    if on_triton(q):
        from bitdelta.engine.ops.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(q, keys, values, block_tables, row_sequence, row_position, block_size, scale, split,
                                      window=window, softcap=softcap)
    return paged_attention_reference(q, keys, values, block_tables, row_sequence, row_position, block_size, scale, window, softcap)


def pool_rows(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Pool rows of positions 0..length-1 of the sequence whose block table this is."""
    positions = torch.arange(length, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def paged_attention_reference(q, keys, values, block_tables, row_sequence, row_position, block_size: int, scale: float,
                              window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    groups = q.shape[1] // keys.shape[1]
    for sequence in torch.unique(row_sequence).tolist():
        rows = (row_sequence == sequence).nonzero(as_tuple=True)[0]
        positions = row_position[rows].long()
        length = int(positions.max()) + 1
        kv_rows = pool_rows(block_tables[sequence], length, block_size)
        k = keys[kv_rows].transpose(0, 1).repeat_interleave(groups, 0)  # [H, L, D]
        v = values[kv_rows].transpose(0, 1).repeat_interleave(groups, 0)
        key_positions = torch.arange(length, device=q.device)[None, :]
        visible = key_positions <= positions[:, None]  # [R, L], causal
        if window is not None:
            visible &= key_positions > positions[:, None] - window
        queries = q[rows].transpose(0, 1)  # [H, R, D]
        if softcap is None:
            o = F.scaled_dot_product_attention(queries[None], k[None], v[None], attn_mask=visible, scale=scale)[0]
        else:
            scores = softcap * torch.tanh((queries @ k.transpose(1, 2)).float() * scale / softcap)
            o = (torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v.float()).to(q.dtype)
        out[rows] = o.transpose(0, 1)
    return out
