"""The all-distinct decode delta on the 1-bit tensor cores (v11; config `bitmma` with `binary`; Gluon, GPU only).

One-row tiles, as v9 (`decode_bitmma.py`), but with no bit expansion: the slot's packed words are
the A operand of mma.m16n8k256.b1 (AND + POPC) as they lie in memory, and the row's x the B operand,
as 32 bit planes of a fixed point (`binary_planes.py` has the arithmetic, the layout and a PyTorch
model of both). An H100 runs that mma at the int8 mma's rate (0.5 an SM and clock, measured), which is
8x the weights a clock; v9 spent two instructions per four weights on the expansion and was bound by
issue (KERNEL_NOTES round 13).

Two launches:
- `_planes_kernel`: program = (row, block of 1024 k): the exponent of the row's |max|, v = trunc(x *
  2^(30 - E)), the 32 planes (a warp ballot per plane and packed word: lane b keeps plane b's word) in
  the kernel layout, and the block's sum of v.
- `_binary_delta_kernel`: program = (one row and its slot, 32 x warps sign rows: two m16 tiles a
  warp). A cp.async ring (as v9's) holds per stage a 1024-k block of the sign rows (one 128-byte line
  each) and the row's planes of it; each of its 4 k-steps runs 8 one-bit mmas a warp (2 tiles x 4
  plane groups) on operands read from the ring in the mma's register order. The epilogue weights the
  32 plane columns of the int32 accumulators in int64 (exact), reduces them over the four lanes that
  hold them and writes y = ws + bias + scale * 2^(E - 30) * (2 sum v u - sum v).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from bitdelta.kernels import binary_planes
from bitdelta.kernels.binary_planes import STEP_PLANE_WORDS, plane_steps
from bitdelta.kernels.configs import KernelConfig
from bitdelta.kernels.decode_bitmma import _issue_word_copies
from bitdelta.kernels.grouping import SlotPlan, segment_tiles
from bitdelta.kernels.launch import fast

FIXED_POINT_BITS = gl.constexpr(binary_planes.FIXED_POINT_BITS)
MIN_EXPONENT = gl.constexpr(binary_planes.MIN_EXPONENT)
STEP_WORDS = gl.constexpr(binary_planes.STEP_WORDS)
BLOCK_STEPS = gl.constexpr(binary_planes.BLOCK_STEPS)
MAX_CHUNKS = gl.constexpr(128)  # partial sums of v a row: K <= 128 x 4 k-steps x 256 = 2^17 (ONE_ROW_MAX_K)

# two 1-bit mmas sharing A (one sign tile, 16 rows x 256 k): plane groups p and p + 1. Each operand's
# four registers are (h, w) pairs, h first: $8-$11 A = a0..a3 (rows g, g + 8 of word 0, of word 1);
# $12-$15 B = (group p, word 0), (p + 1, 0), (p, 1), (p + 1, 1); $16-$23 the accumulators in, $0-$7
# out, each (row g, column 2q), (g + 8, 2q), (g, 2q + 1), (g + 8, 2q + 1) = c0, c2, c1, c3.
_BMMA2 = gl.constexpr(
    "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {$0,$2,$1,$3}, {$8,$9,$10,$11}, {$12,$14}, "
    "{$16,$18,$17,$19};\n\t"
    "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {$4,$6,$5,$7}, {$8,$9,$10,$11}, {$13,$15}, "
    "{$20,$22,$21,$23};")
_BALLOT = gl.constexpr("{ .reg .pred p; setp.ne.b32 p, $1, 0; vote.sync.ballot.b32 $0, p, 0xffffffff; }")


@gluon.constexpr_function
def _only_axis(layout, keep, rank):
    """`layout` sliced down to its dimension `keep` (a 1-D layout for gl.arange along it)."""
    for d in reversed(range(rank)):
        if d != keep:
            layout = gl.SliceLayout(d, layout)
    return layout


@gluon.jit
def _axis(L: gl.constexpr, DIM: gl.constexpr, SIZE: gl.constexpr, RANK: gl.constexpr = 5):
    """0..SIZE-1 along dimension DIM of the layout L (of rank RANK), broadcastable against L."""
    idx = gl.arange(0, SIZE, layout=_only_axis(L, DIM, RANK))
    for d in gl.static_range(RANK):
        if d != DIM:
            idx = gl.expand_dims(idx, d)
    return idx


@gluon.jit
def _row_peak(x_row_ptr, K, CHUNK: gl.constexpr, layout: gl.constexpr):
    """max |x| over one row (CHUNK elements a step, so a 4096-8192-long row takes one round of loads)."""
    ks = gl.arange(0, CHUNK, layout=layout)
    peak = gl.zeros([CHUNK], gl.float32, layout=layout)
    for k0 in range(0, K, CHUNK):
        xv = gl.load(x_row_ptr + k0 + ks, mask=k0 + ks < K, other=0.0)
        peak = gl.maximum(peak, gl.abs(xv.to(gl.float32)))
    return gl.max(peak, axis=0)


@gluon.jit
def _planes_kernel(x_ptr, planes_ptr, row_scale_ptr, sum_v_ptr, K, stride_x, stride_p, BLOCKS):
    """Program = (row, block S of 1024 k), 4 warps: warp u holds packed words 32S + 8u + r (r = 0..7, in
    registers: k-step 4S + u), lane j element j of each. The row's |max| sets the exponent; 32 ballots a word give
    the planes, lane b keeping plane b. Writes what `binary_planes.binary_planes` computes."""
    NW: gl.constexpr = gl.num_warps()
    gl.static_assert(NW == 4, "one 1024-k block a program: a warp per 8 packed words")
    words: gl.constexpr = gl.BlockedLayout([STEP_WORDS, 1], [1, 32], [1, NW], [0, 1])  # [8 words r, 4 warps x 32]
    row = gl.program_id(0).to(gl.int64)
    block = gl.program_id(1)
    x_row_ptr = x_ptr + row * stride_x
    peak = _row_peak(x_row_ptr, K, 8192, gl.BlockedLayout([16], [32], [NW], [0]))
    # |max| = m 2^E, 0.5 <= m < 1: E = biased exponent - 126 (zero and subnormal rows: MIN_EXPONENT)
    exponent = gl.maximum(((peak.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 126, MIN_EXPONENT)
    scale = ((FIXED_POINT_BITS - exponent + 127) << 23).to(gl.float32, bitcast=True)  # 2^(30 - E), exact

    r = gl.expand_dims(gl.arange(0, STEP_WORDS, layout=gl.SliceLayout(1, words)), 1)  # [8, 1]
    t = gl.expand_dims(gl.arange(0, NW * 32, layout=gl.SliceLayout(0, words)), 0)  # [1, 128]
    warp = t // 32
    lane = t % 32
    k = ((block * 32 + warp * 8 + r) * 32 + lane).to(gl.int64)
    xv = gl.load(x_row_ptr + k, mask=k < K, other=0.0)
    v = (xv.to(gl.float32) * scale).to(gl.int32)  # truncation toward zero; |v| < 2^30
    plane_words = gl.zeros([STEP_WORDS, NW * 32], gl.int32, layout=words)
    for b in gl.static_range(32):
        ballot = gl.inline_asm_elementwise(_BALLOT, "=r,r", [(v >> b) & 1], dtype=gl.int32, is_pure=True, pack=1)
        plane_words = gl.where(lane == b, ballot, plane_words)
    # word 32S + 8 warp + r = word r = 2q + w of k-step 4S + warp; plane b = 8p + g ->
    # (4S + warp) * 256 + ((g * 4 + q) * 4 + p) * 2 + w
    offset = (block * 4 + warp) * (STEP_WORDS * 32) + (((lane % 8) * 4 + r // 2) * 4 + lane // 8) * 2 + r % 2
    gl.store(planes_ptr + row * stride_p + offset, plane_words)
    gl.store(sum_v_ptr + row * BLOCKS + block, gl.sum(gl.sum(v.to(gl.int64), axis=1), axis=0))
    if block == 0:
        gl.store(row_scale_ptr + row, ((exponent - FIXED_POINT_BITS + 127) << 23).to(gl.float32, bitcast=True))


@gluon.constexpr_function
def _a_layout(num_warps):
    """The A operand of the warp's m16 tile of one k-step, read from a [16 NW, 8] slice of the words
    ring (row r = 16 warp + 8h + g, word c = 2q + w): registers (h, w) in the mma's order a0..a3."""
    warp_bases = [[16 << j, 0] for j in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=[[8, 0], [0, 1]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=warp_bases, block_bases=[], shape=[16 * num_warps, 8])


@gluon.jit
def _a_operand(w_stage, tile: gl.constexpr, step: gl.constexpr, A: gl.constexpr, L: gl.constexpr):
    """Sign tile `tile` (rows 16 NW tile + 16 warp + 8h + g) of k-step `step` (words 8 step + 2q + w)."""
    NW: gl.constexpr = gl.num_warps()
    a = w_stage.slice(tile * 16 * NW, 16 * NW, dim=0).slice(step * STEP_WORDS, STEP_WORDS, dim=1).load(A)
    a = gl.permute(gl.reshape(a, [NW, 2, 8, 4, 2]), [0, 2, 3, 1, 4])  # (warp, h, g, q, w) -> (warp, g, q, h, w)
    return gl.convert_layout(a, L, assert_trivial=True)


@gluon.constexpr_function
def _b_layout(num_warps):
    """A plane pair of one k-step read from its [32 lanes (4g + q), 4 words (group, word)] ring slot:
    every warp reads the same words (the warp bases are zero)."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2]], lane_bases=[[1, 0], [2, 0], [4, 0], [8, 0], [16, 0]],
                                      warp_bases=[[0, 0]] * (num_warps.bit_length() - 1), block_bases=[], shape=[32, 4])


@gluon.jit
def _b_operand(b_stage, slot: gl.constexpr, B: gl.constexpr, L: gl.constexpr):
    return gl.convert_layout(gl.reshape(b_stage.slice(slot * 32, 32, dim=0).load(B), [1, 8, 4, 2, 2]), L)


@gluon.jit
def _issue_block(w_smem, b_smem, blk, w_ptrs, w_mask, w_cols, KW, WORD_VEC: gl.constexpr, b_ptrs, b_all, NB,
                 STAGES: gl.constexpr):
    """cp.async of block blk (1024 k) into its ring stage: the program's sign rows and the row's planes
    (as [4 k-steps x 2 plane pairs, 32 lanes, 4 words])."""
    stage = blk % STAGES
    _issue_word_copies(w_smem.index(stage), w_ptrs, w_mask, blk, KW, WORD_VEC, BLOCK_STEPS * STEP_WORDS * 32, w_cols)
    async_copy.async_copy_global_to_shared(b_smem.index(stage),
                                           b_ptrs + blk * (BLOCK_STEPS * STEP_WORDS * 32), mask=b_all & (blk < NB))
    async_copy.commit_group()


@gluon.jit
def _bmma4(a, b01, b23, c0, c1, c2, c3):
    c0, c1 = gl.inline_asm_elementwise(_BMMA2, "=r,=r,=r,=r,=r,=r,=r,=r," + "r," * 15 + "r",
                                       [a, b01, c0, c1], dtype=(gl.int32, gl.int32), is_pure=True, pack=4)
    c2, c3 = gl.inline_asm_elementwise(_BMMA2, "=r,=r,=r,=r,=r,=r,=r,=r," + "r," * 15 + "r",
                                       [a, b23, c2, c3], dtype=(gl.int32, gl.int32), is_pure=True, pack=4)
    return c0, c1, c2, c3


@gluon.jit
def _weighted(c0, c1, c2, c3, weight):
    """sum over the four plane groups of c_b * popc, int64 [NW, 8, 4, 2, 2] (plane 8p + 2q + column)."""
    total = c0.to(gl.int64) * weight
    total += c1.to(gl.int64) * (weight << 8)
    total += c2.to(gl.int64) * (weight << 16)
    # group 3 holds plane 31, the sign plane: -2^31 where 2^31 would be
    w3 = weight << 24
    total += c3.to(gl.int64) * gl.where(w3 == (1 << 31), -w3, w3)
    return gl.sum(gl.sum(total, axis=4), axis=2)  # [NW, 8 rows g, 2 halves h]


@gluon.jit
def _binary_delta_kernel(
    planes_ptr, row_scale_ptr, sum_v_ptr, ws_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, tiles_ptr, order_ptr,
    N, KW, NB, stride_p, stride_ws, stride_sg_s, stride_sg_n, stride_sc_s, stride_y,
    HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, WORD_VEC: gl.constexpr,
):
    """Program = (one row and its slot, 32 NW sign rows: two m16 tiles a warp). Walks K in blocks of
    1024 (4 k-steps) through a cp.async ring of the block's words [32 NW, 32] and the row's planes of
    those 4 k-steps; each k-step runs 8 one-bit mmas a warp (2 tiles x 4 plane groups)."""
    NW: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = 32 * NW
    BKW: gl.constexpr = BLOCK_STEPS * STEP_WORDS
    # one element a register: (warp, g, q, h, w) = lane 4g + q of a warp; A's row half h and word w,
    # B's plane group and word, C's row half and column. h before w in registers: the mma's order for
    # A (a0..a3: rows g, g + 8 of word 0, then of word 1); the asm strings reorder B and C
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 2, 2], [1, 8, 4, 1, 1], [NW, 1, 1, 1, 1], [3, 4, 2, 1, 0])
    B: gl.constexpr = _b_layout(NW)
    A: gl.constexpr = _a_layout(NW)
    out_layout: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(4, L))
    w_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BKW // 4), BKW // 4], [NW, 1], [1, 0])
    b_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [NW, 1], [1, 0])
    b_shared: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    # a 16-byte unit of a row xor (row % 8): an A read (rows g, words 8 step + 2q + w) hits each bank twice
    w_shared: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 8, order=[1, 0])

    tile = gl.program_id(0)
    slot = gl.load(tiles_ptr + tile * 3)
    row = gl.load(order_ptr + gl.load(tiles_ptr + tile * 3 + 1)).to(gl.int64)
    has_delta = slot >= 0
    slot64 = gl.maximum(slot, 0).to(gl.int64)
    col0 = gl.program_id(1) * BLOCK_N

    wn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy))
    wk = gl.arange(0, BKW, layout=gl.SliceLayout(0, w_copy))
    w_ptrs = (signs_ptr + slot64 * stride_sg_s * WORD_VEC + (col0 + wn)[:, None] * stride_sg_n * WORD_VEC
              + wk[None, :])
    w_mask = has_delta & ((col0 + wn) < N)[:, None]
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BKW], w_shared)
    # the row's planes: rows 32 (2 step + pair) + 4g + q of a stage hold lane (g, q)'s words of plane
    # groups 2 pair and 2 pair + 1 (4 words: group, word)
    b_row = gl.arange(0, 2 * BLOCK_STEPS * 32, layout=gl.SliceLayout(1, b_copy))[:, None]
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, b_copy))[None, :]
    sp = b_row // 32
    b_ptrs = planes_ptr + row * stride_p + (sp // 2) * (STEP_WORDS * 32) + (b_row % 32) * 8 + (sp % 2) * 4 + j
    b_all = (b_row + j) >= 0
    b_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 2 * BLOCK_STEPS * 32, 4], b_shared)

    for st in gl.static_range(STAGES - 1):
        _issue_block(w_smem, b_smem, st, w_ptrs, w_mask, wk, KW, WORD_VEC, b_ptrs, b_all, NB, STAGES)
    zero = gl.zeros([NW, 8, 4, 2, 2], gl.int32, layout=L)
    c00, c01, c02, c03 = zero, zero, zero, zero  # sign tile 0, plane groups 0..3
    c10, c11, c12, c13 = zero, zero, zero, zero  # sign tile 1
    for blk in range(NB):
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()  # block blk has landed; the stage of block blk - 1 is free again
        _issue_block(w_smem, b_smem, blk + STAGES - 1, w_ptrs, w_mask, wk, KW, WORD_VEC, b_ptrs, b_all, NB, STAGES)
        w_stage = w_smem.index(blk % STAGES)
        for step in gl.static_range(BLOCK_STEPS):
            b01 = _b_operand(b_smem.index(blk % STAGES), 2 * step, B, L)
            b23 = _b_operand(b_smem.index(blk % STAGES), 2 * step + 1, B, L)
            c00, c01, c02, c03 = _bmma4(_a_operand(w_stage, 0, step, A, L), b01, b23, c00, c01, c02, c03)
            c10, c11, c12, c13 = _bmma4(_a_operand(w_stage, 1, step, A, L), b01, b23, c10, c11, c12, c13)
    async_copy.wait_group(0)

    # plane of accumulator element (q, column) in group 0: 2q + column; c_b = 2^b
    q = _axis(L, 2, 4)
    column = _axis(L, 4, 2)
    weight = gl.full([1, 1, 4, 1, 2], 1, gl.int64, layout=L) << (2 * q + column).to(gl.int64)
    vu0 = _weighted(c00, c01, c02, c03, weight)
    vu1 = _weighted(c10, c11, c12, c13, weight)

    blocks = gl.arange(0, MAX_CHUNKS, layout=gl.BlockedLayout([1], [32], [NW], [0]))
    sum_v = gl.sum(gl.load(sum_v_ptr + row * NB + blocks, mask=blocks < NB, other=0), axis=0)
    row_scale = gl.load(row_scale_ptr + row)
    n = col0 + _axis(out_layout, 0, NW, 3) * 16 + _axis(out_layout, 1, 8, 3) + 8 * _axis(out_layout, 2, 2, 3)
    _store_rows(vu0, sum_v, row_scale, n, N, row, slot64, has_delta, ws_ptr, stride_ws, bias_ptr, scales_ptr,
                stride_sc_s, y_ptr, stride_y, HAS_BIAS)
    _store_rows(vu1, sum_v, row_scale, n + 16 * NW, N, row, slot64, has_delta, ws_ptr, stride_ws, bias_ptr, scales_ptr,
                stride_sc_s, y_ptr, stride_y, HAS_BIAS)


@gluon.jit
def _store_rows(vu, sum_v, row_scale, n, N, row, slot64, has_delta, ws_ptr, stride_ws, bias_ptr, scales_ptr,
                stride_sc_s, y_ptr, stride_y, HAS_BIAS: gl.constexpr):
    """y[row, n] = ws + bias + scale * 2^(E - 30) * (2 sum v u - sum v) for one sign tile of each warp."""
    n_mask = n < N
    dot = (2 * vu - sum_v).to(gl.float32) * row_scale
    out = gl.load(ws_ptr + row * stride_ws + n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        out += gl.load(bias_ptr + n, mask=n_mask, other=0.0).to(gl.float32)
    out += gl.load(scales_ptr + slot64 * stride_sc_s + n, mask=n_mask & has_delta, other=0.0) * dot
    gl.store(y_ptr + row * stride_y + n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


def binary_planes_gpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The planes kernel: (planes int32 [M, KS * 256], row scale fp32 [M], partial sums of v int64
    [M, blocks of 1024 k]); `binary_planes.binary_planes` is its reference (the sums there are totals)."""
    m, k = x.shape
    steps = plane_steps(k)
    blocks = steps // binary_planes.BLOCK_STEPS
    if blocks > MAX_CHUNKS:
        raise ValueError(f"binary delta: K = {k} is longer than {MAX_CHUNKS * 1024} (the partial sums a row)")
    planes = torch.empty(m, steps * STEP_PLANE_WORDS, dtype=torch.int32, device=x.device)
    row_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    sum_v = torch.empty(m, blocks, dtype=torch.int64, device=x.device)
    fast(_planes_kernel)[(m, blocks)](x, planes, row_scale, sum_v, k, x.stride(0), planes.stride(0), blocks, num_warps=4)
    return planes, row_scale, sum_v


def binary_delta(x: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, signs: torch.Tensor,
                 scales: torch.Tensor, plan: SlotPlan, config: KernelConfig, y: torch.Tensor) -> torch.Tensor:
    """y = ws + bias + per-slot delta for one-row tiles (config.binary)."""
    n, kw = signs.shape[1], signs.shape[2]
    planes, row_scale, sum_v = binary_planes_gpu(x)
    tiles = segment_tiles(plan, 1)
    word_vec = 4 if signs.stride(0) % 4 == 0 and signs.stride(1) % 4 == 0 and kw % 4 == 0 else 1
    fast(_binary_delta_kernel)[(tiles.shape[0], triton.cdiv(n, 32 * config.num_warps))](
        planes, row_scale, sum_v, ws, bias if bias is not None else y, signs, scales, y, tiles, plan.order,
        n, kw, sum_v.shape[1], planes.stride(0), ws.stride(0), signs.stride(0) // word_vec,
        signs.stride(1) // word_vec, scales.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        STAGES=config.num_stages, WORD_VEC=word_vec, num_warps=config.num_warps,
    )
    return y
