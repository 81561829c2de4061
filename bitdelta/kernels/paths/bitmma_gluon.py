"""The Gluon delta kernels of the BITMMA path (GPU only; imported lazily by `bitmma.py`).

The base product comes from cuBLAS (fp32 `ws`); these kernels add scale[t] * (x . sign[t]) for each
tile of rows sharing a slot. The slot's bit matrix is the M side of an mma and the tile's rows its N
side (8 columns an mma), so one program streams its slot's bits once for its rows. The reduction
dimension of an mma may be visited in any order, as long as x follows the same order: the k index of
the A fragment is chosen so that each 32-bit A register takes its bits from one word with one IMAD
(x 2^(s - j): the bits move to the sign positions) and one LOP3 (mask, xor in a constant), and x is
stored in shared memory in the matching order, so that each thread's B fragment is one contiguous
run (16-byte loads). Two kernels:

- `_bitmma_kernel`, tiles of 2..8, 16, 32 or 64 rows (COLS/8 mmas per expanded A fragment):
  bf16/fp16 m16n8k16, a register = 2 weights = +-1.0 (bits j and j + 16 of a word); x permuted once
  per call on the host (`permute_activations`).
- `_bitmma_int8_kernel`, tiles of one row (the all-distinct batch): int8 m16n8k32, a register =
  4 weights = -64 * sign (bits j, j+8, j+16, j+24): half the instructions a weight and half the
  mma count. The row's x becomes four 7-bit digit planes of a 28-bit fixed point (scale: the row's
  |max|), one plane per mma column, digitised in the kernel on its way to shared memory: the int32
  accumulator holds exact integer products and the epilogue weights the columns 2^21, 2^14, 2^7,
  1 (error ~1e-7 relative, far below the bf16/fp16 rounding of y). Its k order is split over words
  so that each lane reads only its own words (`_words_layout_int8`) from a swizzled ring: shared
  memory bandwidth, not the instruction count, limits this kernel (docs/kernels.md).

Layouts are explicit: words and x are staged in shared memory in a `STAGES`-deep ring (the bits
are the DRAM stream and need many bytes in flight) and read in layouts derived from the mma
operand layouts, so that the bit expansion and the operand assembly are register-local
(`convert_layout(..., assert_trivial=True)` checks that at compile time). The x ring is swizzled
(16-byte chunk index xor row) so that the 8 lanes of a 16-byte load phase hit distinct banks.
One module for both kernels: they share the operand layouts and the sign expansion.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from bitdelta.kernels.grouping import SlotPlan, segment_tiles
from bitdelta.kernels.launch import fast
from bitdelta.kernels.paths.bitmma import ONE_ROW_MAX_K, BitmmaTiles

MMA_COLS = gl.constexpr(8)  # the N side of m16n8k16: the int8 kernel's tile (digit columns), the bf16 one's narrowest
WORD_BITS = gl.constexpr(32)
SUB_K = gl.constexpr(256)  # k per compute step: 32 bf16 x values per thread; one x swizzle period (8 x 16 B)


def _sign_asm(mask: int, constant: int) -> str:
    # $1 = the word, $N = its multiplier 2^(s - j) ($3 for 2 elements a register, $5 for 4): the bits
    # j, j + 16 (bf16/fp16) or j, j + 8, j + 16, j + 24 (int8) move to the sign position of each element.
    # A multiply, not a shift: the shift amount depends on the lane, so ptxas emits SHF, which shares
    # the half-rate ALU pipe with LOP3 and saturated it; IMAD runs on the FMA pipe. lop3 0x6a =
    # (a & b) ^ c: keep the sign bits, xor in a constant: -1.0 in both halves (bit 1 -> +1.0), or
    # 0x40 in every byte (bit 1 -> 0xC0 = -64, bit 0 -> +64).
    multiplier = "$5" if mask == 0x80808080 else "$3"
    return (f"{{ .reg .b32 t; mul.lo.u32 t, $1, {multiplier}; "
            f"lop3.b32 $0, t, {mask:#x}, {constant:#x}, 0x6a; }}")


_SIGN_ASM_BF16 = gl.constexpr(_sign_asm(0x80008000, 0xBF80BF80))
_SIGN_ASM_F16 = gl.constexpr(_sign_asm(0x80008000, 0xBC00BC00))
_SIGN_ASM_INT8 = gl.constexpr(_sign_asm(0x80808080, 0x40404040))

# the int8 kernel: x as DIGITS 7-bit digit planes of a 28-bit fixed point of the row's |max|
DIGITS = gl.constexpr(4)
X_FULL_SCALE = gl.constexpr(127.0 * 2 ** 21)  # |x| = row max -> v = 127 * 2^21: top digit in [-128, 127]
SIGN_MAGNITUDE = gl.constexpr(64.0)  # an expanded weight is -64 * sign (the int8 byte 0xC0 or 0x40)
ROW_MAX_CHUNK = gl.constexpr(4096)  # x elements a block reads per step of the row-max prologue


@gluon.constexpr_function
def remap_layout(ll, move, shape):
    """The distributed layout `ll` with every basis (the coordinate one register, lane or warp bit
    reaches) passed through `move`: the same data in the same registers, seen as a tensor of `shape`."""
    return gl.DistributedLinearLayout(
        reg_bases=[move(b) for b in ll.reg_bases], lane_bases=[move(b) for b in ll.lane_bases],
        warp_bases=[move(b) for b in ll.warp_bases], block_bases=[], shape=shape)


@gluon.constexpr_function
def _words_layout(a_ll):
    """The A operand's layout [BN, BK] seen as [BN, BK/32, 32] (row, word, bit slot): slicing away
    the bit slot gives the layout in which each thread reads exactly the words its A registers use."""
    def split(basis):
        n, kk = basis
        return [n, kk // 32, kk % 32]

    return remap_layout(a_ll, split, [a_ll.shape[0], a_ll.shape[1] // 32, 32])


@gluon.constexpr_function
def _words_layout_int8(a_ll):
    """The int8 A operand [BN, 256] (k_width 4) seen as [BN, 8 words, 32 bit slots]: mma k index
    kk = 32s + 16a + 4q + p (k-step s, register a, lane q, byte p) takes bit 8p + 2(s % 4) + a of word
    2q + s // 4. So the four lanes q of a row read four different words (two contiguous words a row
    and compute step each) instead of all four reading every word, and the bit j = 2(s % 4) + a of a
    register is fixed at compile time."""
    def split(basis):
        n, kk = basis
        s, a, q, p = kk >> 5, (kk >> 4) & 1, (kk >> 2) & 3, kk & 3
        return [n, 2 * q + (s >> 2), 8 * p + 2 * (s & 3) + a]

    assert a_ll.shape[1] == 256, "the int8 word split is written for compute steps of 256"
    return remap_layout(a_ll, split, [a_ll.shape[0], 8, 32])


@gluon.constexpr_function
def _x_layout(b_ll):
    """The bf16 B operand's layout [BK, COLS] seen as the permuted x tile [4 COLS, BK/4] (row 4c + q,
    position r): mma k index kk = 32w + 16a + 8h + 2q + e is stored at q * BK/4 + (8w + 4a + 2h + e), so each
    thread's B registers are one contiguous run (see `permute_activations`)."""
    def move(basis):
        kk, c = basis
        return [4 * c + ((kk >> 1) & 3), (kk & 1) | ((kk >> 3) << 1)]

    return remap_layout(b_ll, move, [4 * b_ll.shape[1], b_ll.shape[0] // 4])


@gluon.constexpr_function
def _x_digits_layout(b_ll):
    """The int8 B operand [BK, 8] (k_width 4) seen as the digit planes [16, BK/4] (row 4d + q,
    position r): mma k index kk = 32w + 16a + 4q + p is stored at 8w + 4a + p of row 4d + q, so each
    thread's B registers are one contiguous run; column c reads digit plane c % 4 (columns 4..7 repeat
    0..3: the c = 4 basis maps to nothing, a shared-memory broadcast)."""
    def move(basis):
        kk, c = basis
        return [4 * (c & 3) + ((kk >> 2) & 3), (kk & 3) | (((kk >> 4) & 1) << 2) | ((kk >> 5) << 3)]

    return remap_layout(b_ll, move, [16, b_ll.shape[0] // 4])


@gluon.constexpr_function
def _split_columns(b_ll):
    """The B operand's layout [BK, 8] seen as [BK, 2, 4] (kk, c // 4, c % 4)."""
    def split(basis):
        kk, c = basis
        return [kk, c >> 2, c & 3]

    return remap_layout(b_ll, split, [b_ll.shape[0], 2, 4])


@gluon.jit
def _x_operand(x_tile, b_layout: gl.constexpr, BK: gl.constexpr, COLS: gl.constexpr):
    """[4 COLS, BK/4] permuted x (rows 4c + q) -> the bf16 mma B operand [BK, COLS]; moves no data."""
    x6 = gl.reshape(x_tile, [COLS, 4, BK // 32, 2, 2, 2])  # (c, q, w, a, h, e)
    x6 = gl.permute(x6, (2, 3, 4, 1, 5, 0))  # (w, a, h, q, e, c): kk = 32w + 16a + 8h + 2q + e
    return gl.convert_layout(gl.reshape(x6, [BK, COLS]), b_layout, assert_trivial=True)


@gluon.jit
def _x_digits_operand(x_tile, b_layout: gl.constexpr, cols3: gl.constexpr, BK: gl.constexpr):
    """[16, BK/4] digit planes -> the int8 mma B operand [BK, 8], column c = plane c % 4; moves no data."""
    x5 = gl.reshape(x_tile, [DIGITS, 4, BK // 32, 2, 4])  # (d, q, w, a, p)
    x5 = gl.permute(x5, (2, 3, 1, 4, 0))  # (w, a, q, p, d): kk = 32w + 16a + 4q + p
    x_kd = gl.convert_layout(gl.reshape(x5, [BK, DIGITS]), gl.SliceLayout(1, cols3), assert_trivial=True)
    x3, _ = gl.broadcast(gl.expand_dims(x_kd, 1), gl.full([1, 2, 1], 0, gl.int8, layout=cols3))
    return gl.convert_layout(gl.reshape(x3, [BK, 2 * DIGITS]), b_layout, assert_trivial=True)


@gluon.jit
def _sign_operand(words, multipliers, a_layout: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  KIND: gl.constexpr):
    """words [BN, BK/32] -> the mma A operand [BN, BK]: +-1 in bf16 (KIND 0) or fp16 (1), one IMAD +
    one LOP3 per two weights; -64 * sign in int8 (2), the same per four weights, with the word split
    of `_words_layout_int8` (BK = 256)."""
    w3, s3 = gl.broadcast(gl.expand_dims(words, 2), multipliers)
    if KIND == 2:
        signs = gl.inline_asm_elementwise(_SIGN_ASM_INT8, "=r,r,r,r,r,r,r,r,r", [w3, s3], dtype=gl.int8,
                                          is_pure=True, pack=4)
        t6 = gl.reshape(signs, [BN, 4, 2, 4, 4, 2])  # (n, q, s2, p, s10, a): word 2q + s2, bit 8p + 2 s10 + a
        t6 = gl.permute(t6, (0, 2, 4, 5, 1, 3))  # (n, s2, s10, a, q, p): kk = 32s + 16a + 4q + p, s = 4 s2 + s10
        signs = gl.reshape(t6, [BN, BK])
    elif KIND == 1:
        signs = gl.reshape(gl.inline_asm_elementwise(_SIGN_ASM_F16, "=r,r,r,r,r", [w3, s3], dtype=gl.float16,
                                                     is_pure=True, pack=2), [BN, BK])
    else:
        signs = gl.reshape(gl.inline_asm_elementwise(_SIGN_ASM_BF16, "=r,r,r,r,r", [w3, s3], dtype=gl.bfloat16,
                                                     is_pure=True, pack=2), [BN, BK])
    return gl.convert_layout(signs, a_layout, assert_trivial=True)


@gluon.jit
def _issue_word_copies(w_smem, w_ptrs, w_mask, kt, KW, WORD_VEC: gl.constexpr, BK: gl.constexpr, w_cols):
    """cp.async of the slot's words [BN, BK/32] of K-tile kt (the caller commits the group)."""
    BKW: gl.constexpr = BK // WORD_BITS
    # whole WORD_VEC-word vectors are in or out together (WORD_VEC divides KW): 16-byte copies
    in_k = (kt * BKW + (w_cols // WORD_VEC) * WORD_VEC) < KW
    async_copy.async_copy_global_to_shared(w_smem, w_ptrs + kt * BKW, mask=w_mask & in_k[None, :])


@gluon.jit
def _bitmma_kernel(
    x_ptr, ws_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, tiles_ptr, order_ptr,
    N, K, KW, KT,
    stride_x, stride_ws, stride_sg_s, stride_sg_n, stride_sc_s, stride_y,
    HAS_BIAS: gl.constexpr, FP16: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr, WORD_VEC: gl.constexpr, COLS: gl.constexpr,
):
    """Program = (tile of <= COLS rows of one slot, BLOCK_N output columns): walks K in BLOCK_K tiles
    through the cp.async ring (words and the host-permuted x), SUB_K at a time on the tensor cores,
    then y = ws + bias + scale * acc."""
    NW: gl.constexpr = gl.num_warps()
    BKW: gl.constexpr = BLOCK_K // WORD_BITS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    bits3: gl.constexpr = _words_layout(gl.to_linear_layout(a_layout, [BLOCK_N, SUB_K]))
    words_layout: gl.constexpr = gl.SliceLayout(2, bits3)
    x_layout: gl.constexpr = _x_layout(gl.to_linear_layout(b_layout, [SUB_K, COLS]))
    # cp.async layouts: 16 bytes per thread and copy
    w_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BKW // 4), BKW // 4], [NW, 1], [1, 0])
    x_copy: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 32), BLOCK_K // 32], [NW, 1], [1, 0])
    w_shared: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    x_shared: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0])

    tile = gl.program_id(0)
    slot = gl.load(tiles_ptr + tile * 3)
    first = gl.load(tiles_ptr + tile * 3 + 1)
    count = gl.load(tiles_ptr + tile * 3 + 2) - first
    has_delta = slot >= 0
    slot64 = gl.maximum(slot, 0).to(gl.int64)
    col0 = gl.program_id(1) * BLOCK_N

    # copy pointers: words [BN, BKW] of the slot, x rows of the tile (permuted: rows 4c + q of each K-tile)
    wn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy))
    wk = gl.arange(0, BKW, layout=gl.SliceLayout(0, w_copy))
    w_ptrs = (signs_ptr + slot64 * stride_sg_s * WORD_VEC + (col0 + wn)[:, None] * stride_sg_n * WORD_VEC
              + wk[None, :])
    w_mask = has_delta & ((col0 + wn) < N)[:, None]
    xr = gl.arange(0, 4 * COLS, layout=gl.SliceLayout(1, x_copy))
    xk = gl.arange(0, BLOCK_K // 4, layout=gl.SliceLayout(0, x_copy))
    x_live = (xr // 4) < count
    x_row = gl.load(order_ptr + first + xr // 4, mask=x_live, other=0).to(gl.int64)
    x_ptrs = x_ptr + x_row[:, None] * stride_x + ((xr % 4) * (BLOCK_K // 4))[:, None] + xk[None, :]

    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BKW], w_shared)
    x_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [STAGES, 4 * COLS, BLOCK_K // 4], x_shared)

    # 2^(15 - j) for the bit slot t = 16a + 8h + 2q + e of a word (j = 8a + 4h + q; e picks j or j + 16)
    t = gl.arange(0, WORD_BITS, layout=gl.SliceLayout(0, gl.SliceLayout(0, bits3)))
    multipliers = gl.expand_dims(gl.expand_dims(1 << (15 - (((t >> 1) & 3) + 4 * (t >> 3))), 0), 0)

    for s in gl.static_range(STAGES - 1):
        _issue_word_copies(w_smem.index(s), w_ptrs, w_mask, s, KW, WORD_VEC, BLOCK_K, wk)
        async_copy.async_copy_global_to_shared(x_smem.index(s), x_ptrs + s * BLOCK_K, mask=x_live[:, None] & (s < KT))
        async_copy.commit_group()
    acc = gl.zeros([BLOCK_N, COLS], gl.float32, layout=mma)
    for kt in range(KT):
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()  # every thread's copies of tile kt have landed; stage kt-1 is free again
        nxt = kt + STAGES - 1
        _issue_word_copies(w_smem.index(nxt % STAGES), w_ptrs, w_mask, nxt, KW, WORD_VEC, BLOCK_K, wk)
        async_copy.async_copy_global_to_shared(x_smem.index(nxt % STAGES), x_ptrs + nxt * BLOCK_K,
                                               mask=x_live[:, None] & (nxt < KT))
        async_copy.commit_group()
        w_stage = w_smem.index(kt % STAGES)
        x_stage = x_smem.index(kt % STAGES)
        for sub in gl.static_range(BLOCK_K // SUB_K):
            words = w_stage.slice(sub * (SUB_K // 32), SUB_K // 32, dim=1).load(words_layout)
            a = _sign_operand(words, multipliers, a_layout, BLOCK_N, SUB_K, 1 if FP16 else 0)
            b = _x_operand(x_stage.slice(sub * (SUB_K // 4), SUB_K // 4, dim=1).load(x_layout), b_layout, SUB_K,
                           COLS)
            acc = mma_v2(a, b, acc)
    async_copy.wait_group(0)

    # y[row_c, n] = ws + bias + scale[slot, n] * acc[n, c]
    n = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    c = gl.arange(0, COLS, layout=gl.SliceLayout(0, mma))
    n_mask = n < N
    c_live = c < count
    rows = gl.load(order_ptr + first + c, mask=c_live, other=0).to(gl.int64)
    mask = n_mask[:, None] & c_live[None, :]
    out = gl.load(ws_ptr + rows[None, :] * stride_ws + n[:, None], mask=mask, other=0.0)
    if HAS_BIAS:
        out += gl.load(bias_ptr + n, mask=n_mask, other=0.0).to(gl.float32)[:, None]
    scale = gl.load(scales_ptr + slot64 * stride_sc_s + n, mask=n_mask & has_delta, other=0.0)
    out += scale[:, None] * acc
    gl.store(y_ptr + rows[None, :] * stride_y + n[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _row_absmax(x_row_ptr, K, layout: gl.constexpr):
    """max |x| over one row of K elements (the whole block takes part; one reduction at the end)."""
    ks = gl.arange(0, ROW_MAX_CHUNK, layout=layout)
    peak = gl.zeros([ROW_MAX_CHUNK], gl.float32, layout=layout)
    for k0 in range(0, K, ROW_MAX_CHUNK):
        xv = gl.load(x_row_ptr + k0 + ks, mask=k0 + ks < K, other=0.0)
        peak = gl.maximum(peak, gl.abs(xv.to(gl.float32)))
    return gl.max(peak, axis=0)


@gluon.jit
def _load_x_tile(x_row_ptr, kt, K, layout: gl.constexpr, BK: gl.constexpr):
    """x[kt * BK : (kt + 1) * BK] of one row as [1, BK], natural k order, zero past K."""
    ks = kt * BK + gl.arange(0, BK, layout=gl.SliceLayout(0, layout))
    return gl.expand_dims(gl.load(x_row_ptr + ks, mask=ks < K, other=0.0), 0)


@gluon.jit
def _digit_planes(x, inv_scale, layout: gl.constexpr, BK: gl.constexpr):
    """x [1, BK] in natural k order -> int8 digit planes [16, BK/4] in the mma order.

    v = trunc(x * inv_scale), |v| <= 127 * 2^21, is written as sum_d digit_d * 2^(7 (3 - d)): digit 0 =
    v >> 21 (signed, in [-128, 127]), digits 1..3 the next 7-bit fields (in [0, 127]). Natural
    k = 256c + 64q + 32 s2 + 8p + 2 s10 + a (bit 8p + 2 s10 + a of word 2q + s2 of compute step c: the
    split of `_words_layout_int8`) goes to row 4d + q, position 64c + 8s + 4a + p with s = 4 s2 + s10
    (`_x_digits_layout`)."""
    v = (x.to(gl.float32) * inv_scale).to(gl.int32)
    d = gl.expand_dims(gl.arange(0, DIGITS, layout=gl.SliceLayout(1, layout)), 1)
    digits = ((v >> (7 * (DIGITS - 1 - d))) & gl.where(d == 0, -1, 127)).to(gl.int8)  # [DIGITS, BK]
    x7 = gl.reshape(digits, [DIGITS, BK // 256, 4, 2, 4, 4, 2])  # (d, c, q, s2, p, s10, a)
    x7 = gl.permute(x7, (0, 2, 1, 3, 5, 6, 4))  # (d, q, c, s2, s10, a, p)
    return gl.reshape(x7, [4 * DIGITS, BK // 4])


@gluon.jit
def _bitmma_int8_kernel(
    x_ptr, ws_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, tiles_ptr, order_ptr,
    N, K, KW, KT,
    stride_x, stride_ws, stride_sg_s, stride_sg_n, stride_sc_s, stride_y,
    HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
    WORD_VEC: gl.constexpr,
):
    """Program = (one row and its slot, BLOCK_N output columns) on the int8 tensor cores: walks K in
    BLOCK_K tiles through the cp.async ring of words; x tiles are loaded one ring stage ahead and
    digitised on their way to shared memory; the epilogue weights the digit columns, rescales and
    writes y = ws + bias + scale * (x . sign)."""
    NW: gl.constexpr = gl.num_warps()
    BKW: gl.constexpr = BLOCK_K // WORD_BITS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    bits3: gl.constexpr = _words_layout_int8(gl.to_linear_layout(a_layout, [BLOCK_N, SUB_K]))
    words_layout: gl.constexpr = gl.SliceLayout(2, bits3)
    b_ll: gl.constexpr = gl.to_linear_layout(b_layout, [SUB_K, MMA_COLS])
    x_layout: gl.constexpr = _x_digits_layout(b_ll)
    cols3: gl.constexpr = _split_columns(b_ll)
    w_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BKW // 4), BKW // 4], [NW, 1], [1, 0])
    # natural x tile: consecutive k along lanes and warps (4 a thread at BK 512, 4 warps: one q group)
    x_natural: gl.constexpr = gl.BlockedLayout([1, max(1, min(8, BLOCK_K // (32 * NW)))], [1, 32], [1, NW], [1, 0])
    x_row_layout: gl.constexpr = gl.BlockedLayout([8], [32], [NW], [0])
    # a lane reads two words of a row a compute step (LDS.64, `_words_layout_int8`): the 4 rows of a 16-lane
    # phase xor their (BKW/4)-word units, so the phase hits 32 distinct banks (2 wavefronts an LDS.64)
    w_shared: gl.constexpr = gl.SwizzledSharedLayout(BKW // 4, 1, 4, order=[1, 0])
    x_shared: gl.constexpr = gl.SwizzledSharedLayout(16, 1, 8, order=[1, 0])

    tile = gl.program_id(0)
    slot = gl.load(tiles_ptr + tile * 3)
    row = gl.load(order_ptr + gl.load(tiles_ptr + tile * 3 + 1)).to(gl.int64)
    has_delta = slot >= 0
    slot64 = gl.maximum(slot, 0).to(gl.int64)
    col0 = gl.program_id(1) * BLOCK_N
    x_row_ptr = x_ptr + row * stride_x

    wn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy))
    wk = gl.arange(0, BKW, layout=gl.SliceLayout(0, w_copy))
    w_ptrs = (signs_ptr + slot64 * stride_sg_s * WORD_VEC + (col0 + wn)[:, None] * stride_sg_n * WORD_VEC
              + wk[None, :])
    w_mask = has_delta & ((col0 + wn) < N)[:, None]

    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BKW], w_shared)
    x_smem = gl.allocate_shared_memory(gl.int8, [STAGES, 4 * DIGITS, BLOCK_K // 4], x_shared)

    # 2^(7 - j) for bit t = 8p + j of a word: bits j, j + 8, j + 16, j + 24 -> the top bits of bytes 0..3
    t = gl.arange(0, WORD_BITS, layout=gl.SliceLayout(0, gl.SliceLayout(0, bits3)))
    multipliers = gl.expand_dims(gl.expand_dims(1 << (7 - (t & 7)), 0), 0)

    for s in gl.static_range(STAGES - 1):  # the words first: they are the DRAM stream
        _issue_word_copies(w_smem.index(s), w_ptrs, w_mask, s, KW, WORD_VEC, BLOCK_K, wk)
        async_copy.commit_group()
    peak = _row_absmax(x_row_ptr, K, x_row_layout)
    inv_scale = gl.where(peak > 0, X_FULL_SCALE / peak, 0.0)
    for s in gl.static_range(STAGES - 1):
        x_smem.index(s).store(_digit_planes(_load_x_tile(x_row_ptr, s, K, x_natural, BLOCK_K), inv_scale,
                                            x_natural, BLOCK_K))
    acc = gl.zeros([BLOCK_N, MMA_COLS], gl.int32, layout=mma)
    for kt in range(KT):
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()  # tile kt's words have landed and its digits are stored; stage kt-1 is free
        nxt = kt + STAGES - 1
        _issue_word_copies(w_smem.index(nxt % STAGES), w_ptrs, w_mask, nxt, KW, WORD_VEC, BLOCK_K, wk)
        async_copy.commit_group()
        x_next = _load_x_tile(x_row_ptr, nxt, K, x_natural, BLOCK_K)  # its latency hides behind the products
        w_stage = w_smem.index(kt % STAGES)
        x_stage = x_smem.index(kt % STAGES)
        for sub in gl.static_range(BLOCK_K // SUB_K):
            words = w_stage.slice(sub * (SUB_K // 32), SUB_K // 32, dim=1).load(words_layout)
            a = _sign_operand(words, multipliers, a_layout, BLOCK_N, SUB_K, 2)
            b = _x_digits_operand(x_stage.slice(sub * (SUB_K // 4), SUB_K // 4, dim=1).load(x_layout), b_layout,
                                  cols3, SUB_K)
            acc = mma_v2(a, b, acc)
        # stage kt-1, free since this iteration's barrier; the next barrier publishes it
        x_smem.index(nxt % STAGES).store(_digit_planes(x_next, inv_scale, x_natural, BLOCK_K))
    async_copy.wait_group(0)

    # x . sign[n] = -(peak / (127 * 2^21 * 64)) * sum_d acc[n, d] * 2^(7 (3 - d)) (columns 4..7 repeat 0..3)
    c = gl.arange(0, MMA_COLS, layout=gl.SliceLayout(0, mma))
    weight = gl.where(c < DIGITS, (1 << (7 * (DIGITS - 1 - (c % DIGITS)))).to(gl.float32), 0.0)
    dot = gl.sum(acc.to(gl.float32) * weight[None, :], axis=1) * (-peak / (X_FULL_SCALE * SIGN_MAGNITUDE))
    n = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    n_mask = n < N
    out = gl.load(ws_ptr + row * stride_ws + n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        out += gl.load(bias_ptr + n, mask=n_mask, other=0.0).to(gl.float32)
    out += gl.load(scales_ptr + slot64 * stride_sc_s + n, mask=n_mask & has_delta, other=0.0) * dot
    gl.store(y_ptr + row * stride_y + n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


def permute_activations(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """x [M, K] -> [M, ceil(K/block_k) * block_k] in the kernel's reduction order (zero padded).

    Within a K-tile, k = 32w + 16e + 8a + 4h + q (word w, bit j = 8a + 4h + q, e: j or j + 16) is
    stored at q * block_k/4 + 8w + 4a + 2h + e: the order of each thread's mma B registers."""
    m, k = x.shape
    k_tiles = triton.cdiv(k, block_k)
    if k_tiles * block_k != k:
        x = torch.nn.functional.pad(x, (0, k_tiles * block_k - k))
    tiles = x.view(m, k_tiles, block_k // 32, 2, 2, 2, 4)  # (w, e, a, h, q)
    return tiles.permute(0, 1, 6, 2, 4, 5, 3).reshape(m, k_tiles * block_k)


def bitmma_delta(x: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, signs: torch.Tensor,
                 scales: torch.Tensor, plan: SlotPlan, tiles: BitmmaTiles, y: torch.Tensor) -> torch.Tensor:
    """y = ws + bias + per-slot delta, for tiles of <= 64 rows of one slot: one-row tiles on the int8
    kernel, taller ones on the bf16/fp16 kernel."""
    n, kw = signs.shape[1], signs.shape[2]
    k = x.shape[1]
    table = segment_tiles(plan, tiles.rows)
    word_vec = 4 if signs.stride(0) % 4 == 0 and signs.stride(1) % 4 == 0 and kw % 4 == 0 else 1
    shape = (n, k, kw, triton.cdiv(k, tiles.block_k))
    strides = (ws.stride(0), signs.stride(0) // word_vec, signs.stride(1) // word_vec, scales.stride(0), y.stride(0))
    bias_arg = bias if bias is not None else y
    if tiles.rows == 1:
        if k > ONE_ROW_MAX_K:
            raise ValueError(f"one-row tiles take K <= {ONE_ROW_MAX_K} (int32 accumulator), got {k}: use rows=8")
        fast(_bitmma_int8_kernel)[(table.shape[0], triton.cdiv(n, tiles.block_n))](
            x, ws, bias_arg, signs, scales, y, table, plan.order, *shape, x.stride(0), *strides,
            HAS_BIAS=bias is not None, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, STAGES=tiles.num_stages,
            WORD_VEC=word_vec, num_warps=tiles.num_warps,
        )
        return y
    xk = permute_activations(x, tiles.block_k)
    fast(_bitmma_kernel)[(table.shape[0], triton.cdiv(n, tiles.block_n))](
        xk, ws, bias_arg, signs, scales, y, table, plan.order, *shape, xk.stride(0), *strides,
        HAS_BIAS=bias is not None, FP16=x.dtype == torch.float16, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        STAGES=tiles.num_stages, WORD_VEC=word_vec, COLS=max(tiles.rows, MMA_COLS.value),
        num_warps=tiles.num_warps,
    )
    return y
