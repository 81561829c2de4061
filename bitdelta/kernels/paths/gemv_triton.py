"""The GEMV kernel (GPU only; imported lazily by `gemv.py`): the whole batch, at most 4 rows, in one
program per column block, base and delta fused on the CUDA cores."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.base_product import StoredBase
from bitdelta.kernels.base_tiles_triton import base_tile
from bitdelta.kernels.grouping import SlotPlan, row_slots
from bitdelta.kernels.launch import fast
from bitdelta.kernels.paths.gemv import GemvTiles


@triton.jit
def _gemv_row_setup(r, M, order_ptr, rslot_ptr, x_ptr, stride_xm, signs_ptr, stride_sg_s, stride_sg_n, scales_ptr,
                    stride_sc_s, cols, col_mask):
    """Row r of the batch (masked past M): its x row pointer, bit rows, scales [BN, 1, 1], flags."""
    live = r < M
    row = tl.load(order_ptr + r, mask=live, other=0)
    slot = tl.load(rslot_ptr + r, mask=live, other=-1)
    has = slot >= 0
    slot64 = tl.maximum(slot, 0).to(tl.int64)
    sg = signs_ptr + slot64 * stride_sg_s + cols[:, None] * stride_sg_n
    # 0 where the row has no delta: w' = w + (+-0) = w there
    sc = tl.load(scales_ptr + slot64 * stride_sc_s + cols, mask=col_mask & has, other=0.0)[:, None, None]
    return row, live, x_ptr + row.to(tl.int64) * stride_xm, sg, sc, has


@triton.jit
def _gemv_row(acc, w, x_row, sg, sc, has, live, k0, koff, xmask, wmask, col_mask, word_off, shift, bitmask,
              SAME_SLOT: tl.constexpr):
    """acc [BN, G] += per-thread sums of x . w' over 8 weights; w' built here unless SAME_SLOT."""
    # [1, G, 8]: the load gets the compute tile's layout (no shared-memory round trip per step)
    xr = tl.load(x_row + k0 + koff, mask=xmask & live, other=0.0).to(tl.float32)
    if not SAME_SLOT:
        words = tl.load(sg + word_off + k0 // 32, mask=has & col_mask[:, None] & wmask, other=0)
        bits = ((words >> shift)[:, :, None] & bitmask) != 0
        w = w + tl.where(bits, sc, -sc)
    return acc + tl.sum(w * xr, axis=2)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, order_ptr, rslot_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_w_scale, stride_sg_s, stride_sg_n, stride_sc_s, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ROWS: tl.constexpr, SAME_SLOT: tl.constexpr, FORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Decode of a few rows (the whole batch, M <= ROWS <= 4, in one program): base and delta in one
    pass on the CUDA cores, w' = w + (bit ? s : -s) in fp32 (exact up to fp32 rounding), y += x . w'.

    A program owns BLOCK_N output columns and streams their base rows and bits once, 16 bytes of
    W per thread: the tile is [BLOCK_N, BLOCK_K/8, 8] so that each thread's 8 weights are
    contiguous, lie in one byte of one packed word, and are summed without a shuffle. Every row
    reuses the W tile from registers; SAME_SLOT (one slot for the batch) builds w' once for all
    rows, otherwise each row builds its own from its slot's bits. Rows are unrolled by hand (3-D
    tiles only): a 4-D [rows, ...] tile made Triton spread the 8 weights over lanes (shuffles).
    Narrow column blocks give N/BLOCK_N programs, enough to keep every SM streaming.

    FORM: the base as stored (`base_tiles_triton`): a quantized one is read in its own bytes (1/2 or
    ~1/4 of fp16) and dequantized in registers.
    """
    G: tl.constexpr = BLOCK_K // 8
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    g = tl.arange(0, G)
    e = tl.arange(0, 8)
    # W and x are loaded as 2-D [.., BLOCK_K] tiles (K the fastest axis across lanes: each warp
    # reads 512 contiguous bytes of a row) and reshaped to [.., G, 8] in registers.
    cols64 = cols.to(tl.int64)
    koff = (g * 8)[None, :, None] + e[None, None, :]  # [1, G, 8]
    word_off = (g // 4)[None, :]  # [1, G]: 4 groups of 8 weights share a word
    shift = ((g % 4) * 8)[None, :]
    bitmask = (1 << e)[None, None, :]

    row0, live0, x0, sg0, sc0, has0 = _gemv_row_setup(0, M, order_ptr, rslot_ptr, x_ptr, stride_xm, signs_ptr,
                                                      stride_sg_s, stride_sg_n, scales_ptr, stride_sc_s, cols, col_mask)
    acc0 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    if ROWS > 1:
        row1, live1, x1, sg1, sc1, has1 = _gemv_row_setup(1, M, order_ptr, rslot_ptr, x_ptr, stride_xm, signs_ptr,
                                                          stride_sg_s, stride_sg_n, scales_ptr, stride_sc_s, cols,
                                                          col_mask)
        acc1 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    if ROWS > 2:
        row2, live2, x2, sg2, sc2, has2 = _gemv_row_setup(2, M, order_ptr, rslot_ptr, x_ptr, stride_xm, signs_ptr,
                                                          stride_sg_s, stride_sg_n, scales_ptr, stride_sc_s, cols,
                                                          col_mask)
        row3, live3, x3, sg3, sc3, has3 = _gemv_row_setup(3, M, order_ptr, rslot_ptr, x_ptr, stride_xm, signs_ptr,
                                                          stride_sg_s, stride_sg_n, scales_ptr, stride_sc_s, cols,
                                                          col_mask)
        acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        xmask = ((k0 + koff) < K) | EVEN_K
        wmask = (((k0 + g * 8) < K) | EVEN_K)[None, :]
        w = base_tile(w_ptr, w_scale_ptr, cols64, col_mask, k0, K, stride_wn, stride_w_scale, BLOCK_K, EVEN_K, FORM)
        w = tl.reshape(w, (BLOCK_N, G, 8)).to(tl.float32)
        if SAME_SLOT:
            words = tl.load(sg0 + word_off + k0 // 32, mask=has0 & col_mask[:, None] & wmask, other=0)
            bits = ((words >> shift)[:, :, None] & bitmask) != 0
            w = w + tl.where(bits, sc0, -sc0)
        acc0 = _gemv_row(acc0, w, x0, sg0, sc0, has0, live0, k0, koff, xmask, wmask, col_mask, word_off, shift,
                         bitmask, SAME_SLOT)
        if ROWS > 1:
            acc1 = _gemv_row(acc1, w, x1, sg1, sc1, has1, live1, k0, koff, xmask, wmask, col_mask, word_off, shift,
                             bitmask, SAME_SLOT)
        if ROWS > 2:
            acc2 = _gemv_row(acc2, w, x2, sg2, sc2, has2, live2, k0, koff, xmask, wmask, col_mask, word_off, shift,
                             bitmask, SAME_SLOT)
            acc3 = _gemv_row(acc3, w, x3, sg3, sc3, has3, live3, k0, koff, xmask, wmask, col_mask, word_off, shift,
                             bitmask, SAME_SLOT)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + row0.to(tl.int64) * stride_ym + cols, (tl.sum(acc0, axis=1) + bias).to(out_ty),
             mask=col_mask & live0)
    if ROWS > 1:
        tl.store(y_ptr + row1.to(tl.int64) * stride_ym + cols, (tl.sum(acc1, axis=1) + bias).to(out_ty),
                 mask=col_mask & live1)
    if ROWS > 2:
        tl.store(y_ptr + row2.to(tl.int64) * stride_ym + cols, (tl.sum(acc2, axis=1) + bias).to(out_ty),
                 mask=col_mask & live2)
        tl.store(y_ptr + row3.to(tl.int64) * stride_ym + cols, (tl.sum(acc3, axis=1) + bias).to(out_ty),
                 mask=col_mask & live3)



def gemv(x: torch.Tensor, base: StoredBase, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
         bias: torch.Tensor | None, tiles: GemvTiles, y: torch.Tensor) -> torch.Tensor:
    """y = the gemv over `base`, the base weight as stored (`base_product.stored`)."""
    m, k = x.shape
    n = base.values.shape[0]
    fast(_gemv_kernel)[(triton.cdiv(n, tiles.block_n),)](
        x, base.values, base.scale if base.scale is not None else scales, bias if bias is not None else y, signs, scales,
        y, plan.order, row_slots(plan),
        m, n, k,
        x.stride(0), base.values.stride(0), base.scale_stride, signs.stride(0), signs.stride(1), scales.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % tiles.block_k == 0, ROWS=tiles.rows,
        SAME_SLOT=len(plan.host_slots) == 1, FORM=base.form, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps,
    )
    return y
