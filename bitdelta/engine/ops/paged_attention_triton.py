"""Triton paged attention for a packed step (what `paged_attention.paged_attention_reference` computes).

Two kernels, both reading keys and values straight from the cache pages through the block table,
with an online softmax (running max and sum, fp32): no gathered copy, no padding to the longest
sequence.

- `_paged_attention_kernel`, one program per (row, query head): walks the row's visible positions
  in chunks of BLOCK_N on the CUDA cores. At decode sizes it is bound by reading the cache once
  from memory (the query heads of one key/value group re-read the same keys, which L2 serves).
- `_prefill_attention_kernel`, one program per (query tile, head): a tile is up to BLOCK_M rows of
  one sequence at consecutive positions (a prefill chunk, `QuerySplit`), so each key block is read
  once for the whole tile and both products run on the tensor cores (flash-attention style, causal
  mask per element). The row kernel alone would re-read the prefix for every query row of a chunk,
  which dominated long prompts' prefill (docs/kernels.md).

A sliding window (WINDOW > 0) starts each walk at the first block the window reaches, so a
windowed layer reads at most its window of the cache; SOFTCAP > 0 caps the scores (Gemma 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.engine.ops.paged_attention import TILE_ROWS
from bitdelta.kernels.launch import fast

LOG2E = 1.4426950408889634
LOG2E_CONST = tl.constexpr(LOG2E)


@triton.jit
def _key_block(table, start, begin, end, kv_head, stride_kv_row, stride_kv_head, dims, dim_ok,
               PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions start..start+BLOCK_N-1 of the sequence whose block table `table` points at, the ones
    in [begin, end), and the offsets (and mask) of their keys and values for one key/value head."""
    positions = start + tl.arange(0, BLOCK_N)
    valid = (positions >= begin) & (positions < end)
    page = tl.load(table + positions // PAGE, mask=valid, other=0).to(tl.int64)
    pool_row = page * PAGE + positions % PAGE
    offsets = pool_row[:, None] * stride_kv_row + kv_head * stride_kv_head + dims[None, :]
    return positions, valid, offsets, valid[:, None] & dim_ok[None, :]


@triton.jit
def _window_start(last_position, WINDOW: tl.constexpr):
    """The first position a row at `last_position` sees: 0, or the start of its sliding window."""
    if WINDOW > 0:
        return tl.maximum(last_position - WINDOW + 1, 0)
    return last_position * 0


@triton.jit
def _capped(scores_log2, SOFTCAP: tl.constexpr):
    """Scores (log2 units) soft-capped, softcap * tanh(score / softcap), where SOFTCAP > 0."""
    if SOFTCAP > 0:
        x = scores_log2 / (LOG2E_CONST * SOFTCAP)
        return SOFTCAP * LOG2E_CONST * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # tanh(x); saturates to +-1 without NaN
    return scores_log2


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, row_sequence_ptr, row_position_ptr, rows_ptr,
    stride_q_row, stride_q_head, stride_kv_row, stride_kv_head, stride_out_row, stride_out_head, stride_table,
    scale_log2, head_dim,
    GROUPS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROW_LIST: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    row = tl.load(rows_ptr + tl.program_id(0)) if ROW_LIST else tl.program_id(0)  # ROW_LIST: the rows outside tiles
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
    begin = _window_start(length - 1, WINDOW)
    for start in range(begin // BLOCK_N * BLOCK_N, length, BLOCK_N):
        _, valid, offsets, tile_ok = _key_block(table, start, begin, length, kv_head, stride_kv_row, stride_kv_head, dims, dim_ok,
                                                PAGE, BLOCK_N)
        k = tl.load(k_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        scores = tl.where(valid, _capped(tl.sum(k * q[None, :], axis=1), SOFTCAP), float("-inf"))  # log2 units
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max)
        v = tl.load(v_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        running_sum = running_sum * rescale + tl.sum(p, axis=0)
        running_max = new_max
    out = acc / running_sum
    tl.store(out_ptr + row * stride_out_row + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, row_sequence_ptr, row_position_ptr, tiles_ptr,
    stride_q_row, stride_q_head, stride_kv_row, stride_kv_head, stride_out_row, stride_out_head, stride_table,
    scale_log2, head_dim,
    GROUPS: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    first = tl.load(tiles_ptr + tl.program_id(0) * 2)
    count = tl.load(tiles_ptr + tl.program_id(0) * 2 + 1)
    head = tl.program_id(1)
    kv_head = head // GROUPS
    sequence = tl.load(row_sequence_ptr + first)
    first_position = tl.load(row_position_ptr + first)
    m = tl.arange(0, BLOCK_M)
    live = m < count
    rows = (first + m).to(tl.int64)
    query_positions = first_position + m  # a tile's rows sit at consecutive positions (QuerySplit)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + rows[:, None] * stride_q_row + head * stride_q_head + dims[None, :],
                mask=live[:, None] & dim_ok[None, :], other=0.0)
    # finite: under a sliding window a row may see nothing of the tile's first blocks, and a max of
    # -inf would make the rescale exp2(-inf + inf) NaN
    running_max = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    table = tables_ptr + sequence.to(tl.int64) * stride_table
    end = first_position + count  # the last row sees positions up to end-1
    begin = _window_start(first_position, WINDOW)  # the first row's window starts earliest
    for start in range(begin // BLOCK_N * BLOCK_N, end, BLOCK_N):
        positions, _, offsets, tile_ok = _key_block(table, start, begin, end, kv_head, stride_kv_row, stride_kv_head, dims, dim_ok,
                                                    PAGE, BLOCK_N)
        k = tl.load(k_ptr + offsets, mask=tile_ok, other=0.0)
        scores = _capped(tl.dot(q, tl.trans(k)) * scale_log2, SOFTCAP)  # fp32, log2 units
        visible = positions[None, :] <= query_positions[:, None]
        if WINDOW > 0:
            visible = visible & (positions[None, :] > query_positions[:, None] - WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        v = tl.load(v_ptr + offsets, mask=tile_ok, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out_row + head * stride_out_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=live[:, None] & dim_ok[None, :])


def paged_attention_triton(q, keys, values, block_tables, row_sequence, row_position, block_size: int, scale: float,
                           split=None, block_n: int = 64, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """`split` (a `QuerySplit` on q's device): its tiles on the prefill kernel, its rows on the row
    kernel; None: every row on the row kernel."""
    rows, heads, head_dim = q.shape
    if keys.stride(2) != 1 or values.stride() != keys.stride() or q.stride(2) != 1:
        raise ValueError("paged attention needs the last dimension of q, keys and values contiguous, and keys and values laid out alike")
    out = torch.empty_like(q)
    if rows == 0:
        return out
    tables = block_tables.to(torch.int32).contiguous()
    row_sequence = row_sequence.to(torch.int32).contiguous()
    row_position = row_position.to(torch.int32).contiguous()
    common = (q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1), tables.stride(0),
              scale * LOG2E, head_dim)
    shapes = dict(GROUPS=heads // keys.shape[1], PAGE=block_size, BLOCK_D=triton.next_power_of_2(head_dim),
                  WINDOW=window or 0, SOFTCAP=float(softcap or 0.0))
    single = row_sequence if split is None else split.rows  # the row list is unused without a split
    if split is None or split.rows.numel():
        fast(_paged_attention_kernel)[(rows if split is None else split.rows.numel(), heads)](
            q, keys, values, out, tables, row_sequence, row_position, single, *common,
            BLOCK_N=block_n, ROW_LIST=split is not None, num_warps=4, **shapes,
        )
    if split is not None and split.tiles.numel():
        # tl.dot reduces over at least 16 elements: narrower heads are padded with masked zeros
        fast(_prefill_attention_kernel)[(split.tiles.shape[0], heads)](
            q, keys, values, out, tables, row_sequence, row_position, split.tiles, *common,
            BLOCK_M=TILE_ROWS, BLOCK_N=64, num_warps=4, num_stages=2, **{**shapes, "BLOCK_D": max(16, shapes["BLOCK_D"])},
        )
    return out
