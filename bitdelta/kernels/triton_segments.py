"""Triton kernel for the multi-tenant 1-bit delta linear (GPU only; imported lazily).

One kernel serves decode and prefill; only its tile shapes differ (see `configs.py`). The rows of
the batch are grouped by slot (`grouping.py`) and cut into tiles that never mix slots. A program
takes one (row tile, column block) pair and walks K once:

    acc_base += x_tile @ W_base[cols].T                  (fused variant only)
    acc_sign += x_tile @ expand(bits[slot, cols]).T      (skipped for slot -1)
    y[rows, cols] = acc_base + bias + scale[slot, cols] * acc_sign

so each tile reads its slot's packed bits once, whatever the number of its rows. In the split
variant the base product comes from cuBLAS as fp32 (`ws`) and the kernel adds the delta to it;
that pays when many distinct slots would otherwise each re-read the base columns.

Signs are expanded to exact +-1 values in the activation dtype and multiplied on the tensor cores
(`tl.dot`, fp32 accumulation), or, for tiles of very few rows with the base from cuBLAS, summed
one bit plane at a time in fp32 on the CUDA cores (`_bitplane_kernel`, config `use_fma`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.configs import KernelConfig
from bitdelta.kernels.grouping import SlotPlan, segment_tiles

# Bit patterns of -1.0: xor-ing in the packed bit (moved to the sign position) makes bit 1 -> +1.0.
_NEG_ONE_F32 = tl.constexpr(-1082130432)  # 0xBF800000 as int32
_NEG_ONE_F16 = tl.constexpr(0xBC00)
_NEG_ONE_BF16 = tl.constexpr(0xBF80)


@triton.jit
def expand_signs(words, dtype: tl.constexpr):
    """int32 words [BN, BKW] -> +-1 [BN, BKW * 32] of `dtype`; column 32w + j is bit j of word w.

    The bit index is the leading axis while expanding, so Triton keeps it in each thread's
    registers: every shift is then an immediate and no word is copied across lanes. The values
    are built as bit patterns (the bit xor-ed into the sign of -1.0), avoiding int-to-float
    conversions: the expansion runs once per weight per tile, so its cost matters.
    """
    bn: tl.constexpr = words.shape[0]
    bkw: tl.constexpr = words.shape[1]
    bit = (words[None, :, :] >> tl.arange(0, 32)[:, None, None]) & 1  # [32, BN, BKW]
    if dtype == tl.float32:
        signs = ((bit << 31) ^ _NEG_ONE_F32).to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        signs = ((bit << 15) ^ _NEG_ONE_F16).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        signs = ((bit << 15) ^ _NEG_ONE_BF16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.reshape(tl.permute(signs, (1, 2, 0)), (bn, bkw * 32))


@triton.jit
def _bitplane_kernel(
    x_ptr, ws_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, tiles_ptr, order_ptr,
    N, K, KW,
    stride_xm, stride_wsm, stride_sg_s, stride_sg_n, stride_sc_s, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The CUDA-core delta path for tiles of very few rows; the base product comes from cuBLAS (ws).

    x . sign = 2 * sum_{bit set} x - sum x. A thread holds one word column (kw) of several bit rows,
    so each x value it loads serves all of them, and bit j of a word costs one LOP3 (bit ->
    predicate) and one predicated FADD. The K loop is software-pipelined (cp.async into shared
    memory) through an explicit `num_stages`: Triton does not pipeline loads that feed no tl.dot.
    """
    BKW: tl.constexpr = BLOCK_K // 32
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)

    r = first + tl.arange(0, ROWS)
    row_mask = r < end
    rows = tl.load(order_ptr + r, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    has_delta = slot >= 0

    jw = tl.arange(0, BKW)
    sign_rows = signs_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_sg_s + cols[:, None] * stride_sg_n
    word_mask = has_delta & col_mask[:, None]
    x_rows = x_ptr + rows[:, None, None] * stride_xm
    acc = tl.zeros((ROWS, BLOCK_N, BKW), dtype=tl.float32)
    x_sum = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    one = tl.full((1, 1, 1), 1, tl.int32)
    # An explicit num_stages makes Triton software-pipeline these loads (cp.async into shared
    # memory) although no tl.dot consumes them; without it the bit loads sat in each iteration.
    for kw0 in tl.range(0, KW, BKW, num_stages=NUM_STAGES):
        kw = kw0 + jw
        words = tl.load(sign_rows + kw[None, :], mask=word_mask & ((kw < KW) | EVEN_K)[None, :], other=0)
        ks = kw0 * 32 + tl.arange(0, BLOCK_K)
        x_sum += tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=((ks < K) | EVEN_K)[None, :],
                         other=0.0).to(tl.float32)
        # Rows past the tile's end read row order[0]'s x (valid memory); they are never stored.
        xk = x_rows + (kw * 32)[None, None, :]
        kmask = ((kw * 32 < K) | EVEN_K)[None, None, :]  # a word past K has no set bits: any x will do
        w3 = words[None, :, :]
        for j in tl.static_range(32):
            xj = tl.load(xk + j, mask=kmask, other=0.0)
            # ptxas makes this one LOP3 (bit -> predicate) and one predicated FADD per weight
            acc = tl.where((w3 & (one << j)) != 0, acc + xj.to(tl.float32), acc)

    out = tl.load(ws_ptr + rows[:, None] * stride_wsm + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                  other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if has_delta:
        delta = 2.0 * tl.sum(acc, axis=2) - tl.sum(x_sum, axis=1)[:, None]  # one cross-lane reduction per tile
        scale = tl.load(scales_ptr + slot.to(tl.int64) * stride_sc_s + cols, mask=col_mask, other=0.0)
        out += scale[None, :] * delta
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _segment_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, tiles_ptr, order_ptr,
    N, K, KW,
    stride_xm, stride_wn, stride_wsm, stride_sg_s, stride_sg_n, stride_sc_s, stride_ym,
    HAS_BIAS: tl.constexpr, FUSE_BASE: tl.constexpr, EVEN_K: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tiles vary fastest, so the programs sharing a column block (and its base columns) run
    # together and the base is read from DRAM about once.
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)

    r = first + tl.arange(0, ROWS)
    row_mask = r < end
    rows = tl.load(order_ptr + r, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N

    acc_base = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_sign = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    has_delta = slot >= 0
    sign_rows = signs_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_sg_s + cols[:, None] * stride_sg_n
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = (ks < K) | EVEN_K  # EVEN_K: no tail, and no per-element K compares
        # Zero activations past K neutralise the padding bits (0 -> -1) of the last word.
        xk = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if FUSE_BASE:
            wk = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :],
                         mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            acc_base += tl.dot(xk, tl.trans(wk))
        # No branch on slot >= 0 here: loads under a branch are not software-pipelined (measured:
        # 2x slower). A base-only tile reads no bits (masked) and discards its delta product.
        kw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        words = tl.load(sign_rows + kw[None, :], mask=has_delta & col_mask[:, None] & (kw < KW)[None, :], other=0)
        acc_sign += tl.dot(xk, tl.trans(expand_signs(words, xk.dtype)))

    if not FUSE_BASE:
        acc_base = tl.load(ws_ptr + rows[:, None] * stride_wsm + cols[None, :],
                           mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    if HAS_BIAS:
        acc_base += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if has_delta:
        scale = tl.load(scales_ptr + slot.to(tl.int64) * stride_sc_s + cols, mask=col_mask, other=0.0)
        acc_base += scale[None, :] * acc_sign
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc_base.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def segment_matmul(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    plan: SlotPlan,
    bias: torch.Tensor | None,
    config: KernelConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] in x's dtype; the arguments are those of `reference.bitdelta_matmul` (x fp16/bf16
    on CUDA). `out`, if given, receives the result (tests pass a NaN-filled one)."""
    x = x.contiguous()
    signs = signs.contiguous()
    scales = scales.to(torch.float32).contiguous()
    m, k = x.shape
    n = base_weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    if config.fuse_base:
        ws = y  # unused: the kernel computes the base product itself
        weight = base_weight if base_weight.stride(1) == 1 else base_weight.contiguous()
    else:
        ws = torch.mm(x, base_weight.t(), out_dtype=torch.float32)  # cuBLAS, fp32 out: one rounding
        weight = x  # unused
    tiles = segment_tiles(plan, config.rows)
    grid = (tiles.shape[0], triton.cdiv(n, config.block_n))
    common = dict(HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0, ROWS=config.rows,
                  BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
                  num_stages=config.num_stages)
    if config.use_fma:
        _bitplane_kernel[grid](
            x, ws, bias if bias is not None else y, signs, scales, y, tiles, plan.order,
            n, k, signs.shape[-1],
            x.stride(0), ws.stride(0), signs.stride(0), signs.stride(1), scales.stride(0), y.stride(0),
            NUM_STAGES=config.num_stages, **common,
        )
        return y
    _segment_kernel[grid](
        x, weight, ws, bias if bias is not None else y, signs, scales, y, tiles, plan.order,
        n, k, signs.shape[-1],
        x.stride(0), weight.stride(0), ws.stride(0), signs.stride(0), signs.stride(1), scales.stride(0),
        y.stride(0),
        FUSE_BASE=config.fuse_base, **common,
    )
    return y
