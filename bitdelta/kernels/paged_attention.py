"""Attention over a paged KV cache for a packed step: the public entry point and its reference.

    out = paged_attention(q, keys, values, block_tables, row_sequence, row_position, block_size, scale)

A step packs the new tokens of many sequences side by side (decode rows and prefill chunks). Row
i belongs to sequence row_sequence[i] at position row_position[i] and attends, causally, to that
sequence's positions 0..row_position[i], whose keys and values sit in the pool rows its block table
names (position p is row block_tables[s, p // block_size] * block_size + p % block_size). The
current rows' own keys must already be written.

On a CUDA fp16/bf16 tensor with Triton it runs one kernel for the whole step
(`paged_attention_triton.py`); otherwise this file's reference: one SDPA call per sequence over
its gathered keys, which defines what the kernel computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    row_sequence: torch.Tensor,
    row_position: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """out [T, H, D] in q's dtype for q [T, H, D], keys/values [pool rows, kv_heads, D] (one layer),
    block_tables int [S, max_blocks], row_sequence / row_position int [T]. H must be a multiple of
    kv_heads (grouped-query attention)."""
    if q.shape[1] % keys.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {keys.shape[1]} key/value heads")
    from bitdelta.kernels import triton_available

    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and triton_available():
        from bitdelta.kernels.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(q, keys, values, block_tables, row_sequence, row_position, block_size, scale)
    return paged_attention_reference(q, keys, values, block_tables, row_sequence, row_position, block_size, scale)


def pool_rows(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Pool rows of positions 0..length-1 of the sequence whose block table this is."""
    positions = torch.arange(length, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def paged_attention_reference(q, keys, values, block_tables, row_sequence, row_position, block_size: int, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    groups = q.shape[1] // keys.shape[1]
    for sequence in torch.unique(row_sequence).tolist():
        rows = (row_sequence == sequence).nonzero(as_tuple=True)[0]
        positions = row_position[rows].long()
        length = int(positions.max()) + 1
        kv_rows = pool_rows(block_tables[sequence], length, block_size)
        k = keys[kv_rows].transpose(0, 1).repeat_interleave(groups, 0)  # [H, L, D]
        v = values[kv_rows].transpose(0, 1).repeat_interleave(groups, 0)
        visible = torch.arange(length, device=q.device)[None, :] <= positions[:, None]  # [R, L], causal
        o = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], k[None], v[None], attn_mask=visible, scale=scale)
        out[rows] = o[0].transpose(0, 1)
    return out
