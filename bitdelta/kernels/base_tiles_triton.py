"""The base weight's tiles as every Triton kernel reads them (GPU only; imported lazily): a plain
fp16/bf16 base as stored, or a quantized base (`bitdelta.quant`) read as stored and dequantized in
registers. The forms are `base_product.StoredBase`'s."""

from __future__ import annotations

import triton
import triton.language as tl

PLAIN = tl.constexpr(0)  # fp16/bf16 values
ROW_SCALED = tl.constexpr(1)  # int8 or fp8 e4m3 values, one fp32 scale per row
GROUP_SCALED = tl.constexpr(2)  # int4: two values a byte (low nibble first, offset by 8), one fp32 scale per 128 of a row
GROUP = tl.constexpr(128)


@triton.jit
def base_tile(w_ptr, scale_ptr, rows, row_mask, ks, k_mask, stride_w, stride_scale, FORM: tl.constexpr):
    """The base's [R, BK] tile at rows `rows` (int64 [R]) and columns `ks` [BK]: as stored (PLAIN), or
    dequantized in fp32 (ROW_SCALED, GROUP_SCALED); zero outside the masks."""
    # one return at the end: the compiler types every branch, pruned or not (the interpreter does not)
    if FORM == GROUP_SCALED:
        # each byte loaded once and split into its two columns (a byte per column would load it twice
        # and gather; both spill at tensor-core tile sizes), the scale once per group of the tile's row
        BK: tl.constexpr = ks.shape[0]
        even_ks, _ = tl.split(tl.reshape(ks, (BK // 2, 2)))
        even_mask, _ = tl.split(tl.reshape(k_mask, (BK // 2, 2)))
        packed = tl.load(w_ptr + rows[:, None] * stride_w + (even_ks // 2)[None, :],
                         mask=row_mask[:, None] & even_mask[None, :], other=0x88).to(tl.int32)  # 0x88: two zeros
        values = tl.reshape(tl.join((packed & 15) - 8, (packed >> 4) - 8), (rows.shape[0], BK)).to(tl.float32)
        if BK >= GROUP:  # whole groups: a [R, BK / GROUP] tile of scales
            group_ks = tl.max(tl.reshape(ks, (BK // GROUP, GROUP)), axis=1)
            group_mask = tl.max(tl.reshape(k_mask.to(tl.int32), (BK // GROUP, GROUP)), axis=1) > 0
            scale = tl.load(scale_ptr + rows[:, None] * stride_scale + (group_ks // GROUP)[None, :],
                            mask=row_mask[:, None] & group_mask[None, :], other=0.0)
            w = tl.reshape(tl.reshape(values, (rows.shape[0], BK // GROUP, GROUP)) * scale[:, :, None], (rows.shape[0], BK))
        else:  # the tile lies in one group
            scale = tl.load(scale_ptr + rows * stride_scale + tl.max(ks, axis=0) // GROUP, mask=row_mask, other=0.0)
            w = values * scale[:, None]
    else:
        w = tl.load(w_ptr + rows[:, None] * stride_w + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if FORM == ROW_SCALED:
            w = w.to(tl.float32) * tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0)[:, None]
    return w


@triton.jit
def nibbles(w_ptr, scale_ptr, rows, row_mask, k0, K, stride_w, stride_scale, SPAN: tl.constexpr, EVEN_K: tl.constexpr):
    """An int4 base's columns k0 .. k0 + SPAN at rows `rows`, the span inside one scale group, kept
    apart: the even columns (low nibbles) and the odd ones (high nibbles) as int32 [R, SPAN / 2] in
    -8..7 (zero past the group's padding and outside the row mask), and the group's scale of each
    row [R]. A kernel that splits x's
    columns alike (`x_halves`) needs no interleave of the weights."""
    # the whole group is stored (rows are padded to whole groups with zeros), so one scalar says
    # whether the span is there: the mask stays uniform and the bytes load as vectors
    byte = k0 // 2 + tl.arange(0, SPAN // 2)
    mask = row_mask[:, None] & ((k0 < K) | EVEN_K)
    packed = tl.load(w_ptr + rows[:, None] * stride_w + byte[None, :], mask=mask, other=0x88).to(tl.int32)  # 0x88: two zeros
    scale = tl.load(scale_ptr + rows * stride_scale + k0 // GROUP, mask=row_mask & ((k0 < K) | EVEN_K), other=0.0)
    return (packed & 15) - 8, (packed >> 4) - 8, scale


@triton.jit
def x_halves(x_rows, row_mask, k0, K, SPAN: tl.constexpr, EVEN_K: tl.constexpr):
    """x's columns k0 .. k0 + SPAN (`x_rows`: each row's pointer [R, 1]) as its even and odd columns
    [R, SPAN / 2]: loaded whole (the load stays one contiguous, pipelined read), split in registers."""
    ks = k0 + tl.arange(0, SPAN)
    xk = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & ((ks < K) | EVEN_K)[None, :], other=0.0)
    return tl.split(tl.reshape(xk, (xk.shape[0], SPAN // 2, 2)))
