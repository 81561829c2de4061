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
def base_tile(w_ptr, scale_ptr, rows, row_mask, k0, K, stride_w, stride_scale, BK: tl.constexpr, EVEN_K: tl.constexpr,
              FORM: tl.constexpr):
    """The base's [R, BK] tile at rows `rows` (int64 [R]) and columns k0 .. k0 + BK (k0 a multiple of
    BK; EVEN_K: K a multiple of BK, no column mask): as stored (PLAIN), or dequantized in fp32
    (ROW_SCALED, GROUP_SCALED); zero outside the rows and K."""
    # one return at the end: the compiler types every branch, pruned or not (the interpreter does not)
    if FORM == GROUP_SCALED:
        # eight columns a 32-bit word (nibble e of word w is column 8w + e, little-endian bytes, low
        # nibble first): the words load as vectors and unpack with the nibble as the minor axis, as the
        # sign bits do (`signs_triton.expand_signs`); each word takes its group's scale. Rows are stored
        # padded to whole groups, so a word is there when its group starts below K.
        kw = k0 // 8 + tl.arange(0, BK // 8)
        group = kw // (GROUP // 8)
        word_mask = row_mask[:, None] & ((group * GROUP < K) | EVEN_K)[None, :]
        words = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_w // 4) + kw[None, :],
                        mask=word_mask, other=-2004318072)  # 0x88888888: eight zeros
        values = _offset_to_fp32((words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15, 8)  # [R, BK / 8, 8]
        scale = tl.load(scale_ptr + rows[:, None] * stride_scale + group[None, :], mask=word_mask, other=0.0)
        w = tl.reshape(values * scale[:, :, None], (rows.shape[0], BK))  # past K: padding, zeros
    else:
        ks = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + rows[:, None] * stride_w + ks[None, :], mask=row_mask[:, None] & ((ks < K) | EVEN_K)[None, :], other=0.0)
        if FORM == ROW_SCALED:  # int8 converts (I2F): faster here than `_offset_to_fp32`
            w = w.to(tl.float32) * tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0)[:, None]
    return w


@triton.jit
def stored_values(w, DTYPE: tl.constexpr):
    """int8 or fp8 e4m3 values `w` in DTYPE (bf16/fp16), exact. e4m3 -> bf16 goes through fp32 (fp8 ->
    f16 pairs, f16 -> f32 on the FMA pipe, f32 pairs -> bf16): the direct conversion takes an F2F a value
    on the conversion pipe (16 a clock an SM on Hopper)."""
    if w.dtype == tl.float8e4nv and DTYPE == tl.bfloat16:
        w = w.to(tl.float16).to(tl.float32)
    return w.to(DTYPE)


@triton.jit
def _offset_to_fp32(stored, OFFSET: tl.constexpr):
    """stored - OFFSET in fp32 for integers `stored` in 0 .. 2^23: the bits of 2^23 + stored read as
    fp32, less 2^23 + OFFSET (exact). An integer add and an fp32 add, where a conversion takes the
    conversion pipe (I2F: 16 a clock an SM on Hopper, against 128 fp32 adds): GEMV over int4 measured
    4.5% faster so; int8 (a sign extension more) measured 5-13% slower, so it converts."""
    return (stored + 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def nibble_values(w_ptr, scale_ptr, rows, row_mask, k0, K, stride_w, stride_scale, SPAN: tl.constexpr,
                  EVEN_K: tl.constexpr, DTYPE: tl.constexpr):
    """An int4 base's columns k0 .. k0 + SPAN at rows `rows`, the span inside one scale group, kept
    apart: the even columns (low nibbles) and the odd ones (high nibbles) as DTYPE [R, SPAN / 2] in
    -8..7 (zero past the group's padding and outside the row mask), and the group's scale of each row
    [R]. A kernel that splits x's columns alike (`x_halves`) needs no interleave of the weights.

    The values are made from bits, not converted (I2F: 16 a clock an SM on Hopper): BIAS + nibble is
    BIAS's bits or'ed with the nibble (BIAS 2^23 in fp32, 128 in bf16, 1024 in fp16: its last mantissa
    bits are free), less BIAS + 8; exact. Compiled for sm_90 a K step of the stored product issues 220
    instructions where converting (one I2F a weight) issued 343."""
    # the whole group is stored (rows are padded to whole groups with zeros), so one scalar says
    # whether the span is there: the mask stays uniform and the bytes load as vectors
    stored = (k0 < K) | EVEN_K
    byte = k0 // 2 + tl.arange(0, SPAN // 2)
    packed = tl.load(w_ptr + rows[:, None] * stride_w + byte[None, :], mask=row_mask[:, None] & stored,
                     other=0x88)  # 0x88: two zeros
    scale = tl.load(scale_ptr + rows * stride_scale + k0 // GROUP, mask=row_mask & stored, other=0.0)
    if DTYPE == tl.float32:
        packed = packed.to(tl.int32)
        even = _offset_to_fp32(packed & 15, 8)
        odd = _offset_to_fp32(packed >> 4, 8)
    else:
        packed = packed.to(tl.int16)
        bias_bits: tl.constexpr = 0x4300 if DTYPE == tl.bfloat16 else 0x6400
        offset = tl.full((1, 1), 136.0 if DTYPE == tl.bfloat16 else 1032.0, tl.float32).to(DTYPE)  # BIAS + 8
        even = ((packed & 15) | bias_bits).to(DTYPE, bitcast=True) - offset
        odd = (((packed >> 4) & 15) | bias_bits).to(DTYPE, bitcast=True) - offset
    return even, odd, scale


@triton.jit
def x_halves(x_rows, row_mask, k0, K, SPAN: tl.constexpr, EVEN_K: tl.constexpr):
    """x's columns k0 .. k0 + SPAN (`x_rows`: each row's pointer [R, 1]) as its even and odd columns
    [R, SPAN / 2]: loaded whole (the load stays one contiguous, pipelined read), split in registers."""
    ks = k0 + tl.arange(0, SPAN)
    xk = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & ((ks < K) | EVEN_K)[None, :], other=0.0)
    return tl.split(tl.reshape(xk, (xk.shape[0], SPAN // 2, 2)))
