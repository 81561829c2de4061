"""Triton paged attention for a packed step (what `paged_attention.paged_attention_reference` computes).

One program per (row, query head): it walks the row's visible positions in chunks of BLOCK_N,
looks each position's pool row up in the sequence's block table, and keeps an online softmax
(running max and sum, fp32) so keys and values are read once, straight from the cache pages, with
no gathered copy and no padding to the longest sequence. Decode rows and prefill chunks of any
length share the launch. The query heads of one key/value group re-read the same keys, which the
L2 cache serves; at decode sizes the kernel is bound by reading the cache once from memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, row_sequence_ptr, row_position_ptr,
    stride_q_row, stride_q_head, stride_kv_row, stride_kv_head, stride_out_row, stride_out_head, stride_table,
    scale_log2, head_dim,
    GROUPS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUPS
    sequence = tl.load(row_sequence_ptr + row)
    length = tl.load(row_position_ptr + row) + 1  # causal: positions 0..own position
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + row * stride_q_row + head * stride_q_head + dims, mask=dim_ok, other=0.0).to(tl.float32) * scale_log2
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    table = tables_ptr + sequence.to(tl.int64) * stride_table
    for start in range(0, length, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < length
        page = tl.load(table + positions // PAGE, mask=valid, other=0).to(tl.int64)
        pool_row = page * PAGE + positions % PAGE
        offsets = pool_row[:, None] * stride_kv_row + kv_head * stride_kv_head + dims[None, :]
        tile_ok = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))  # log2 units
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max)
        v = tl.load(v_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        running_sum = running_sum * rescale + tl.sum(p, axis=0)
        running_max = new_max
    out = acc / running_sum
    tl.store(out_ptr + row * stride_out_row + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def paged_attention_triton(q, keys, values, block_tables, row_sequence, row_position, block_size: int, scale: float, block_n: int = 64) -> torch.Tensor:
    rows, heads, head_dim = q.shape
    if keys.stride(2) != 1 or values.stride() != keys.stride() or q.stride(2) != 1:
        raise ValueError("paged attention needs the last dimension of q, keys and values contiguous, and keys and values laid out alike")
    out = torch.empty_like(q)
    if rows == 0:
        return out
    tables = block_tables.to(torch.int32).contiguous()
    _paged_attention_kernel[(rows, heads)](
        q, keys, values, out, tables, row_sequence.to(torch.int32).contiguous(), row_position.to(torch.int32).contiguous(),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        scale * LOG2E, head_dim,
        GROUPS=heads // keys.shape[1], PAGE=block_size, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    return out
