"""The segment kernel (GPU only; imported lazily): a program per (tile of one slot's rows, column
block), for the MERGED_TILES and DOT paths. Rows are grouped by slot (`grouping.py`) and cut into
tiles that never mix slots, so each tile reads its slot's packed bits once whatever its rows. A
program walks K once (with SPLIT_K, one of that many ranges of K):

    MERGE:   acc += x_tile @ merged[cols].T, merged = dtype(W + scale * sign) built in registers
             (the very weights `bitdelta merge` writes: one tensor-core product instead of a base
             and a sign product, for one extra rounding of each weight; W is read as stored, a
             quantized base dequantized in registers: `base_tiles_triton.py`); TRANSPOSED computes
             acc^T = merged @ x_tile^T, so the merged tile is wgmma's A operand straight from
             registers (as the B operand Triton stages it through shared memory and waits on
             every product). With SPLIT_K, each program writes an fp32 partial and the last of a
             tile's programs to arrive adds them in split order and writes y.
    else:    acc_sign += x_tile @ expand(bits[slot, cols]).T, then y = ws + bias + scale * acc_sign
             with ws the base product cuBLAS computed in fp32 (DOT).

Tiles vary fastest on grid axis 0, so the programs sharing a column block (and its base columns)
run together and the base is read from DRAM about once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.base_product import PLAIN, StoredBase
from bitdelta.kernels.base_tiles_triton import GROUP_SCALED, base_tile
from bitdelta.kernels.grouping import SlotPlan, segment_tiles
from bitdelta.kernels.launch import fast
from bitdelta.kernels.paths.problem import Tiles
from bitdelta.kernels.signs_triton import expand_signs, merge_tile, merged_nibble_dots
from bitdelta.kernels.split_k import split_buffers
from bitdelta.kernels.split_k_triton import k_range, sum_of_splits


@triton.jit
def _tile_rows_cols(tiles_ptr, order_ptr, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile (grid axis 0: slot, first and end of its rows in the sorted order) and
    column block (axis 1): the slot, the batch rows it covers and the output columns, with masks."""
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    r = first + tl.arange(0, ROWS)
    row_mask = r < end
    rows = tl.load(order_ptr + r, mask=row_mask, other=0).to(tl.int64)  # rows x strides may pass 2^31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slot, rows, row_mask, cols, cols < N


@triton.jit
def _segment_kernel(
    x_ptr, w_ptr, w_scale_ptr, ws_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, tiles_ptr, order_ptr, partials_ptr,
    counters_ptr, N, K, KW,
    stride_xm, stride_wn, stride_w_scale, stride_wsm, stride_sg_s, stride_sg_n, stride_sc_s, stride_ym, stride_ps,
    HAS_BIAS: tl.constexpr, MERGE: tl.constexpr, EVEN_K: tl.constexpr, FORM: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr, SPLIT_K: tl.constexpr,
):
    slot, rows, row_mask, cols, col_mask = _tile_rows_cols(tiles_ptr, order_ptr, N, ROWS, BLOCK_N)

    if TRANSPOSED:  # acc_t[cols, rows] += merged . x^T, merged being wgmma's register operand
        acc_t = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    else:
        acc_base = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_sign = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    has_delta = slot >= 0
    sign_rows = signs_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_sg_s + cols[:, None] * stride_sg_n
    if MERGE:  # zero for a base-only tile: its merged weights are the base's, bit for bit
        merge_scale = tl.load(scales_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_sc_s + cols,
                              mask=col_mask & has_delta, other=0.0)
    k_first, k_end = k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_first, k_end, BLOCK_K):
        if MERGE and FORM == GROUP_SCALED:  # int4: even and odd columns apart, a scale group at a time
            x_rows = x_ptr + rows[:, None] * stride_xm
            if TRANSPOSED:
                acc_t = merged_nibble_dots(acc_t, x_rows, row_mask, w_ptr, w_scale_ptr, sign_rows, has_delta, merge_scale, cols,
                                           col_mask, k0, K, KW, stride_wn, stride_w_scale, BLOCK_K, EVEN_K, True)
            else:
                acc_base = merged_nibble_dots(acc_base, x_rows, row_mask, w_ptr, w_scale_ptr, sign_rows, has_delta, merge_scale,
                                              cols, col_mask, k0, K, KW, stride_wn, stride_w_scale, BLOCK_K, EVEN_K, False)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = (ks < K) | EVEN_K  # EVEN_K: no tail, and no per-element K compares
            # Zero activations past K neutralise the padding bits (0 -> -1) of the last word.
            xk = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if MERGE:
                wk = base_tile(w_ptr, w_scale_ptr, cols.to(tl.int64), col_mask, k0, K, stride_wn, stride_w_scale, BLOCK_K,
                               EVEN_K, FORM)
            # No branch on slot >= 0 here: loads under a branch are not software-pipelined. A base-only
            # tile reads no bits (masked) and discards its delta product.
            kw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            words = tl.load(sign_rows + kw[None, :], mask=has_delta & col_mask[:, None] & (kw < KW)[None, :], other=0)
            if MERGE:
                merged = merge_tile(wk, merge_scale, words, xk.dtype)
                if TRANSPOSED:
                    acc_t += tl.dot(merged, tl.trans(xk))
                else:
                    acc_base += tl.dot(xk, tl.trans(merged))
            else:
                acc_sign += tl.dot(xk, tl.trans(expand_signs(words, xk.dtype)))

    if TRANSPOSED:
        acc_base = tl.trans(acc_t)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT_K == 1:  # the base (cuBLAS's, or this pass's), the bias, then the delta
        if not MERGE:
            acc_base = _tile(ws_ptr, rows, cols, stride_wsm, out_mask)
        acc_base = _add_bias(acc_base, bias_ptr, cols, col_mask, HAS_BIAS)
        if has_delta and not MERGE:
            acc_base += _delta_scale(scales_ptr, slot, cols, col_mask, stride_sc_s)[None, :] * acc_sign
        _store_y(acc_base, y_ptr, rows, cols, stride_ym, out_mask)
    else:
        # (merged form only) this program's share of K; the last of the tile's SPLIT_K programs to
        # arrive adds them up
        last, total = sum_of_splits(acc_base, partials_ptr, counters_ptr, rows, cols, N, stride_ps, out_mask, SPLIT_K)
        if last:
            total = _add_bias(total, bias_ptr, cols, col_mask, HAS_BIAS)
            _store_y(total, y_ptr, rows, cols, stride_ym, out_mask)


@triton.jit
def _tile(ptr, rows, cols, stride_m, mask):
    """An fp32 [rows, cols] tile of a row-major matrix (cuBLAS's base product `ws`)."""
    return tl.load(ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_y(acc, y_ptr, rows, cols, stride_ym, mask):
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_bias(acc, bias_ptr, cols, col_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _delta_scale(scales_ptr, slot, cols, col_mask, stride_sc_s):
    return tl.load(scales_ptr + slot.to(tl.int64) * stride_sc_s + cols, mask=col_mask, other=0.0)


def segment_product(x: torch.Tensor, weight: StoredBase | None, ws: torch.Tensor, bias: torch.Tensor | None,
                    signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan, tiles: Tiles, y: torch.Tensor,
                    merge: bool, transposed: bool = False, split_k: int = 1) -> torch.Tensor:
    """y = the segment kernel's result: merged (`weight`: the base as stored, `base_product.stored`) or
    on the fp32 base product `ws` (weight None; ws unused in the merged form: any tensor). K is split
    only in the merged form."""
    base = weight if merge else StoredBase(x, None, PLAIN)  # unread without merge
    m, k = x.shape
    n = y.shape[1]
    table = segment_tiles(plan, tiles.rows)
    grid = (table.shape[0], triton.cdiv(n, tiles.block_n), split_k)
    if split_k > 1 and not merge:
        raise ValueError("K is split only in the merged form")
    partials, counters = split_buffers(y, grid)
    fast(_segment_kernel)[grid](
        x, base.values, base.scale if base.scale is not None else scales, ws, bias if bias is not None else y, signs, scales, y, table, plan.order, partials, counters,
        n, k, signs.shape[-1],
        x.stride(0), base.values.stride(0), base.scale_stride, ws.stride(0), signs.stride(0), signs.stride(1), scales.stride(0),
        y.stride(0), m * n,
        HAS_BIAS=bias is not None, MERGE=merge, EVEN_K=k % tiles.block_k == 0, FORM=base.form,
        ROWS=tiles.rows,
        TRANSPOSED=transposed, SPLIT_K=split_k, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return y
