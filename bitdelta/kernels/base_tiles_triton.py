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
    mask = row_mask[:, None] & k_mask[None, :]
    # one return at the end: the compiler types every branch, pruned or not (the interpreter does not)
    if FORM == GROUP_SCALED:
        # each byte is loaded for both of its columns (the second load hits L1)
        packed = tl.load(w_ptr + rows[:, None] * stride_w + (ks // 2)[None, :], mask=mask, other=0).to(tl.int32)
        values = ((packed >> ((ks % 2) * 4)[None, :]) & 15) - 8
        scale = tl.load(scale_ptr + rows[:, None] * stride_scale + (ks // GROUP)[None, :], mask=mask, other=0.0)
        w = values.to(tl.float32) * scale
    else:
        w = tl.load(w_ptr + rows[:, None] * stride_w + ks[None, :], mask=mask, other=0.0)
        if FORM == ROW_SCALED:
            w = w.to(tl.float32) * tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0)[:, None]
    return w
