"""The grouped experts kernel (GPU only; imported lazily by `experts.py`): a program per (expert,
column block) walks the expert's (slot) segments of pairs, each in tiles of ROWS pairs over all of
K, with the merged weights built in registers as the segment kernel's merged form builds them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.base_product import stored
from bitdelta.kernels.base_tiles_triton import GROUP_SCALED, base_tile
from bitdelta.kernels.launch import fast
from bitdelta.kernels.signs_triton import merge_tile, merged_nibble_dots


@triton.jit
def _experts_kernel(
    x_ptr, w_ptr, w_scale_ptr, signs_ptr, scales_ptr, y_ptr, order_ptr, starts_ptr, sizes_ptr,
    N, K, KW, SLOTS,
    stride_xm, stride_we, stride_wn, stride_w_scale, stride_se, stride_ss, stride_sn, stride_ce, stride_cs, stride_ym,
    FORM: tl.constexpr, EVEN_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SEGMENTS: tl.constexpr,
):
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    w_scale_expert = w_scale_ptr + expert.to(tl.int64) * N * stride_w_scale  # a quantized base's rows are E x N
    # the expert's segment sizes and starts in one load each (slot -1, base only, then 0..S-1): an expert
    # no pair routes to (most of them, in decode) exits after it, and the walk reads no memory to skip
    # an empty segment
    segments = tl.arange(0, SEGMENTS)
    in_expert = segments < SLOTS + 1
    sizes = tl.load(sizes_ptr + expert * (SLOTS + 1) + segments, mask=in_expert, other=0)
    if tl.sum(sizes, axis=0) > 0:
        starts = tl.load(starts_ptr + expert * (SLOTS + 1) + segments, mask=in_expert, other=0)
        for segment in range(0, SLOTS + 1):
            size = tl.sum(tl.where(segments == segment, sizes, 0), axis=0)
            if size > 0:
                first = tl.sum(tl.where(segments == segment, starts, 0), axis=0)
                slot = segment - 1
                has_delta = slot >= 0
                delta = expert.to(tl.int64) * stride_se + tl.maximum(slot, 0).to(tl.int64) * stride_ss
                merge_scale = tl.load(scales_ptr + expert * stride_ce + tl.maximum(slot, 0) * stride_cs + cols,
                                      mask=col_mask & has_delta, other=0.0)
                for tile in range(first, first + size, ROWS):
                    _pair_tile(x_ptr, w_expert, w_scale_expert, signs_ptr + delta + cols[:, None] * stride_sn, y_ptr, order_ptr,
                               tile, first + size, cols, col_mask, merge_scale, has_delta, K, KW, stride_xm, stride_wn,
                               stride_w_scale, stride_ym, FORM, EVEN_K, ROWS, BLOCK_K)


@triton.jit
def _pair_tile(x_ptr, w_ptr, w_scale_ptr, sign_rows, y_ptr, order_ptr, tile, end, cols, col_mask, merge_scale, has_delta,
               K, KW, stride_xm, stride_wn, stride_w_scale, stride_ym,
               FORM: tl.constexpr, EVEN_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Up to ROWS pairs of one segment (sorted positions tile..end) by the program's columns, over all of K."""
    r = tile + tl.arange(0, ROWS)
    row_mask = r < end
    rows = tl.load(order_ptr + r, mask=row_mask, other=0).to(tl.int64)
    acc = tl.zeros((ROWS, cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if FORM == GROUP_SCALED:  # int4: even and odd columns apart, a scale group at a time
            acc = merged_nibble_dots(acc, x_ptr + rows[:, None] * stride_xm, row_mask, w_ptr, w_scale_ptr, sign_rows, has_delta,
                                     merge_scale, cols, col_mask, k0, K, KW, stride_wn, stride_w_scale, BLOCK_K, EVEN_K, False)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = (ks < K) | EVEN_K
            # zero activations past K neutralise the padding bits (0 -> -1) of the last word
            xk = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wk = base_tile(w_ptr, w_scale_ptr, cols.to(tl.int64), col_mask, k0, K, stride_wn, stride_w_scale, BLOCK_K, EVEN_K,
                           FORM)
            kw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            words = tl.load(sign_rows + kw[None, :], mask=has_delta & col_mask[:, None] & (kw < KW)[None, :], other=0)
            acc += tl.dot(xk, tl.trans(merge_tile(wk, merge_scale, words, xk.dtype)))
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def expert_tiles(pairs: int, experts: int) -> tuple[int, int, int, int, int]:
    """(rows, block_n, block_k, num_warps, num_stages): 16-pair tiles while a segment holds a few pairs
    (decode), 64 once experts average more than 64 pairs (prompts)."""
    rows = 64 if pairs > 64 * experts else 16
    return rows, 32, 128, 4, 3


def grouped_expert_matmul(x: torch.Tensor, base_weights, signs: torch.Tensor, scales: torch.Tensor,
                          order: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """y [P, N] for the pairs sorted by (expert, slot): `order` the pairs in that order, `starts` and
    `sizes` [E * (S + 1)] each segment's first position in `order` and its pair count."""
    x = x.contiguous()
    count, slots, n, kw = signs.shape
    k = x.shape[1]
    base = stored(base_weights)  # [E, N, K], or a quantized base's [E * N, K'] and its scales
    values = base.values.reshape(count, n, -1)
    signs, scales = signs.contiguous(), scales.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    rows, block_n, block_k, warps, stages = expert_tiles(x.shape[0], count)
    fast(_experts_kernel)[(count, triton.cdiv(n, block_n))](
        x, values, base.scale if base.scale is not None else scales, signs, scales, y, order, starts, sizes,
        n, k, kw, slots,
        x.stride(0), values.stride(0), values.stride(1), base.scale_stride, signs.stride(0), signs.stride(1), signs.stride(2),
        scales.stride(0), scales.stride(1), y.stride(0),
        FORM=base.form, EVEN_K=k % block_k == 0, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k,
        SEGMENTS=triton.next_power_of_2(slots + 1),
        num_warps=warps, num_stages=stages,
    )
    return y
