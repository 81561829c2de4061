"""Packed sign bits expanded inside Triton kernels: the one expansion the tl.dot paths and the merge
kernel share (GPU only; imported lazily). The layout is `bitdelta.pack`'s: bit j of word w is
column 32w + j, 1 meaning +1; `reference.merged_weight` defines the merged weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def merge_tile(w, scale, words, dtype: tl.constexpr):
    """A tile's merged weights [BN, BK] in `dtype`: w + scale[:, None] * sign(words) in fp32, rounded
    once, as `bitdelta merge` writes them (`reference.merged_weight`)."""
    return (w.to(tl.float32) + scale[:, None] * expand_signs(words, tl.float32)).to(dtype)

