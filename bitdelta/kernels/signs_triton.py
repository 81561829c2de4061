"""Packed sign bits expanded inside Triton kernels (GPU only; imported lazily): to +-1 for the tl.dot
delta product (`expand_signs`), to +-scale for the merged weights every Triton kernel builds
(`signed_scales`, `merge_tile`). The layout is `bitdelta.pack`'s: bit j of word w is column 32w + j,
1 meaning +1; `reference.merged_weight` defines the merged weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bitdelta.kernels.base_tiles_triton import GROUP, nibble_values, x_halves

# Bit patterns of -1.0: xor-ing in the packed bit (moved to the sign position) makes bit 1 -> +1.0.
_NEG_ONE_F16 = tl.constexpr(0xBC00)
_NEG_ONE_BF16 = tl.constexpr(0xBF80)
_SIGN_BIT = tl.constexpr(-2147483648)  # 0x80000000 as int32


@triton.jit
def expand_signs(words, dtype: tl.constexpr):
    """int32 words [BN, BKW] -> +-1 [BN, BKW * 32] of `dtype` (fp16 or bf16): column 32w + j is bit j
    of word w.

    The bit index is the leading axis while expanding, so Triton keeps it in each thread's
    registers and no word is copied across lanes. The values are built as bit patterns (the bit
    xor-ed into the sign of -1.0), avoiding int-to-float conversions: the expansion runs once per
    weight per tile, so its cost matters.
    """
    bn: tl.constexpr = words.shape[0]
    bkw: tl.constexpr = words.shape[1]
    bit = (words[None, :, :] >> tl.arange(0, 32)[:, None, None]) & 1  # [32, BN, BKW]
    if dtype == tl.float16:
        signs = ((bit << 15) ^ _NEG_ONE_F16).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        signs = ((bit << 15) ^ _NEG_ONE_BF16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.reshape(tl.permute(signs, (1, 2, 0)), (bn, bkw * 32))


@triton.jit
def signed_scales(words, scale, FIRST: tl.constexpr = 0, STEP: tl.constexpr = 1):
    """scale * sign(words) in fp32 [BN, BKW * 32 / STEP] for int32 words [BN, BKW] and scales [BN]:
    bits FIRST, FIRST + STEP, ... of each word (all of them by default: column 32w + j is bit j of
    word w; STEP 2 gives the even or the odd columns), laid out as `expand_signs` lays them out.
    Exact: each bit shifted to the sign position and xor-ed into -scale's bits, a shift and one
    three-input logic op a weight where expanding +-1 and multiplying took four."""
    bn: tl.constexpr = words.shape[0]
    bkw: tl.constexpr = words.shape[1]
    bits: tl.constexpr = 32 // STEP
    to_sign = 31 - (FIRST + STEP * tl.arange(0, bits))
    negated = scale.to(tl.int32, bitcast=True) ^ _SIGN_BIT  # -scale (bit 0 keeps it)
    signed = ((words[None, :, :] << to_sign[:, None, None]) & _SIGN_BIT) ^ negated[None, :, None]  # [bits, BN, BKW]
    return tl.reshape(tl.permute(signed.to(tl.float32, bitcast=True), (1, 2, 0)), (bn, bkw * bits))


@triton.jit
def merge_tile(w, scale, words, dtype: tl.constexpr):
    """A tile's merged weights [BN, BK] in `dtype`: w + scale[:, None] * sign(words) in fp32, rounded
    once, as `bitdelta merge` writes them (`reference.merged_weight`)."""
    return (w.to(tl.float32) + signed_scales(words, scale)).to(dtype)


@triton.jit
def merged_nibbles(w_ptr, w_scale_ptr, sign_rows, has_delta, merge_scale, cols, col_mask, k0, K, KW, stride_wn,
                   stride_w_scale, SPAN: tl.constexpr, EVEN_K: tl.constexpr, dtype: tl.constexpr):
    """The merged weights of an int4 base's columns k0 .. k0 + SPAN (inside one scale group), the even
    and the odd columns apart [BN, SPAN / 2] (`base_tiles_triton.nibble_values`): dequantized nibble + scale *
    sign in fp32, rounded once, the very weights `merge_tile` builds interleaved. `sign_rows`: each
    column's row of packed bits [BN, 1]."""
    low, high, group_scale = nibble_values(w_ptr, w_scale_ptr, cols.to(tl.int64), col_mask, k0, K, stride_wn,
                                           stride_w_scale, SPAN, EVEN_K, tl.float32)
    kw = k0 // 32 + tl.arange(0, SPAN // 32)
    words = tl.load(sign_rows + kw[None, :], mask=has_delta & col_mask[:, None] & (kw < KW)[None, :], other=0)
    even = low * group_scale[:, None] + signed_scales(words, merge_scale, 0, 2)
    odd = high * group_scale[:, None] + signed_scales(words, merge_scale, 1, 2)
    return even.to(dtype), odd.to(dtype)


@triton.jit
def merged_nibble_dots(acc, x_rows, row_mask, w_ptr, w_scale_ptr, sign_rows, has_delta, merge_scale, cols, col_mask, k0, K, KW,
                       stride_wn, stride_w_scale, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TRANSPOSED: tl.constexpr):
    """acc += x[:, k0:k0+BLOCK_K] @ merged[cols, k0:k0+BLOCK_K].T over an int4 base (acc^T += ... when
    TRANSPOSED), a scale group (or the part of one BLOCK_K spans) at a time: x's even and odd columns
    (`x_halves`) against the even and odd columns' merged weights (`merged_nibbles`), two dots."""
    SPAN: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    for g in tl.static_range(0, BLOCK_K, SPAN):
        x_even, x_odd = x_halves(x_rows, row_mask, k0 + g, K, SPAN, EVEN_K)
        even, odd = merged_nibbles(w_ptr, w_scale_ptr, sign_rows, has_delta, merge_scale, cols, col_mask, k0 + g, K, KW,
                                   stride_wn, stride_w_scale, SPAN, EVEN_K, x_even.dtype)
        if TRANSPOSED:
            acc = tl.dot(odd, tl.trans(x_odd), tl.dot(even, tl.trans(x_even), acc))
        else:
            acc = tl.dot(x_odd, tl.trans(odd), tl.dot(x_even, tl.trans(even), acc))
    return acc
