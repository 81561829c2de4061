"""The stored product of a decode batch over an int8/fp8 base in Gluon (GPU only; imported lazily by
`base_product_triton.stored_product` for `ProductTiles(gluon=True)`): out = x @ W.T * row_scale + bias
for up to 64 rows, both mma operands loaded from global memory straight into registers.

What it tries (docs/kernels.md, lead 7): the Triton product at 17-64 rows is latency-bound at one
program an SM, its tiles staged through shared memory. Here the base's rows are the M side of
m16n8k16 mmas and x's rows the N side (`COLS`); the reduction order of an mma is free as long as
both operands follow it, so mma index kk = 16s + 8h + 2q + e of a K tile takes natural
k = (BK/4) q + 4s + 2h + e, and each thread's A and B registers hold one contiguous run of BK/4
values a row: vector loads, no shared memory, no permutation of x. Each program loads the next K
tile of both operands while it multiplies the last; K may be split over programs (a 4096 x 11008
layer has only 688 warps' worth of 16 base rows). Not dispatched: `python -m benchmarks.quantized_base
--product-tiles` times it beside the Triton tiles.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from bitdelta.kernels.base_product import ROW_SCALED, ProductTiles, StoredBase
from bitdelta.kernels.launch import fast
from bitdelta.kernels.paths.bitmma_gluon import remap_layout
from bitdelta.kernels.paths.problem import next_pow2
from bitdelta.kernels.split_k import split_buffers

MAX_COLS = 64  # x rows a program takes (the mma's N side)


@gluon.constexpr_function
def _natural_k(ll, transposed):
    """The mma operand layout `ll` ([rows, BK] for A, [BK, cols] for B) seen over natural k: mma index
    16s + 8h + 2q + e holds k = (BK/4) q + 4s + 2h + e. `transposed` (B) also swaps the axes, to
    [cols, BK] as x lies in memory."""
    k_axis = 0 if transposed else 1
    bk = ll.shape[k_axis]

    def move(basis):
        kk = basis[k_axis]
        k = (bk // 4) * ((kk >> 1) & 3) + 4 * (kk >> 4) + 2 * ((kk >> 3) & 1) + (kk & 1)
        return [basis[1], k] if transposed else [basis[0], k]

    shape = [ll.shape[1], bk] if transposed else [ll.shape[0], bk]
    return remap_layout(ll, move, shape)


@gluon.constexpr_function
def _k_runs_first(ll, k_axis):
    """`ll` with each thread's registers reordered so that its contiguous run along k comes first:
    the same elements in each thread, now loaded as vectors (a register order with the other axis
    between two k bits loads two bytes at a time)."""
    def k_only(basis):
        return all(v == 0 for axis, v in enumerate(basis) if axis != k_axis)

    regs = sorted(ll.reg_bases, key=lambda b: (0, b[k_axis]) if k_only(b) else (1, 0))
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=ll.lane_bases, warp_bases=ll.warp_bases,
                                      block_bases=[], shape=ll.shape)


@gluon.jit
def _a_operand(w, a_layout: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    """[BN, BK] in natural k -> the mma A operand [BN, BK]; moves no data."""
    w5 = gl.permute(gl.reshape(w, [BN, 4, BK // 16, 2, 2]), (0, 2, 3, 1, 4))  # (n, s, h, q, e)
    return gl.convert_layout(gl.reshape(w5, [BN, BK]), a_layout, assert_trivial=True)


@gluon.jit
def _b_operand(x, b_layout: gl.constexpr, COLS: gl.constexpr, BK: gl.constexpr):
    """[COLS, BK] x rows in natural k -> the mma B operand [BK, COLS]; moves no data."""
    x5 = gl.permute(gl.reshape(x, [COLS, 4, BK // 16, 2, 2]), (2, 3, 1, 4, 0))  # (s, h, q, e, c)
    return gl.convert_layout(gl.reshape(x5, [BK, COLS]), b_layout, assert_trivial=True)


@gluon.jit
def _values(w, dtype: gl.constexpr):
    """int8 or fp8 e4m3 values in `dtype`, exact; e4m3 -> bf16 through fp32, off the conversion pipe
    (as `base_tiles_triton.stored_values`)."""
    if w.dtype == gl.float8e4nv and dtype == gl.bfloat16:
        w = w.to(gl.float16).to(gl.float32)
    return w.to(dtype)


@gluon.jit
def _stored_product_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partials_ptr, counters_ptr, M, N, K, stride_x,
                           stride_w, stride_out, stride_ps, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr,
                           BLOCK_K: gl.constexpr, COLS: gl.constexpr, SPLIT_K: gl.constexpr):
    """Program = (BLOCK_N base rows, COLS x rows, one of SPLIT_K ranges of K): acc[n, m] += W[n, k] x[m, k]
    over its range, then out[m, n] = acc[n, m] * scale[n] + bias[n] (split: by the last program of the
    tile to arrive, over the fp32 partials in split order, as `split_k_triton.sum_of_splits`)."""
    NW: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    w_layout: gl.constexpr = _natural_k(gl.to_linear_layout(a_layout, [BLOCK_N, BLOCK_K]), False)
    x_layout: gl.constexpr = _natural_k(gl.to_linear_layout(b_layout, [BLOCK_K, COLS]), True)
    w_load: gl.constexpr = _k_runs_first(w_layout, 1)
    x_load: gl.constexpr = _k_runs_first(x_layout, 1)

    k_first = 0
    k_end = K
    if SPLIT_K > 1:  # whole BLOCK_K steps a range, the last range shorter
        per_split = gl.cdiv(gl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_first = gl.program_id(2) * per_split
        k_end = gl.minimum(K, k_first + per_split)
    col0 = gl.program_id(0) * BLOCK_N
    row0 = gl.program_id(1) * COLS
    wn = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_load))
    wk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, w_load))
    w_ptrs = w_ptr + wn.to(gl.int64)[:, None] * stride_w + wk[None, :]
    w_rows = (wn < N)[:, None]
    xm = row0 + gl.arange(0, COLS, layout=gl.SliceLayout(1, x_load))
    xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_load))
    x_ptrs = x_ptr + xm.to(gl.int64)[:, None] * stride_x + xk[None, :]
    x_rows = (xm < M)[:, None]

    acc = gl.zeros([BLOCK_N, COLS], gl.float32, layout=mma)
    w_next = gl.load(w_ptrs + k_first, mask=w_rows & ((k_first + wk) < k_end)[None, :], other=0.0)
    x_next = gl.load(x_ptrs + k_first, mask=x_rows & ((k_first + xk) < k_end)[None, :], other=0.0)
    for k0 in range(k_first, k_end, BLOCK_K):
        w_tile, x_tile = w_next, x_next
        k1 = k0 + BLOCK_K  # the next tile's loads are in flight while this one multiplies (masked off past the range)
        w_next = gl.load(w_ptrs + k1, mask=w_rows & ((k1 + wk) < k_end)[None, :], other=0.0)
        x_next = gl.load(x_ptrs + k1, mask=x_rows & ((k1 + xk) < k_end)[None, :], other=0.0)
        w_tile = gl.convert_layout(w_tile, w_layout)  # registers renamed within each thread
        x_tile = gl.convert_layout(x_tile, x_layout)
        a = _a_operand(_values(w_tile, x_tile.dtype), a_layout, BLOCK_N, BLOCK_K)
        acc = mma_v2(a, _b_operand(x_tile, b_layout, COLS, BLOCK_K), acc)

    n = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    m = row0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, mma))
    mask = (n < N)[:, None] & (m < M)[None, :]
    if SPLIT_K == 1:
        _store_out(acc, scale_ptr, bias_ptr, out_ptr, n, m, N, stride_out, mask, HAS_BIAS)
    else:
        partials = partials_ptr + m.to(gl.int64)[None, :] * N + n[:, None]
        stride_ps = gl.cast(stride_ps, gl.int64)  # splits x M x N may pass 2^31
        gl.store(partials + gl.program_id(2) * stride_ps, acc, mask=mask)
        gl.thread_barrier()  # every thread's partial is written before the arrival is counted
        counter = counters_ptr + gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)
        if gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = gl.zeros([BLOCK_N, COLS], gl.float32, layout=mma)
            for split in gl.static_range(SPLIT_K):  # in split order: the sum does not depend on arrival
                total += gl.load(partials + split * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(counter, 0)  # ready for the next launch
            _store_out(total, scale_ptr, bias_ptr, out_ptr, n, m, N, stride_out, mask, HAS_BIAS)


@gluon.jit
def _store_out(acc, scale_ptr, bias_ptr, out_ptr, n, m, N, stride_out, mask, HAS_BIAS: gl.constexpr):
    """out[m, n] = acc[n, m] * scale[n] + bias[n]."""
    n_mask = n < N
    out = acc * gl.load(scale_ptr + n, mask=n_mask, other=0.0)[:, None]
    if HAS_BIAS:
        out += gl.load(bias_ptr + n, mask=n_mask, other=0.0).to(gl.float32)[:, None]
    gl.store(out_ptr + m.to(gl.int64)[None, :] * stride_out + n[:, None], out.to(out_ptr.dtype.element_ty), mask=mask)


def stored_product_gluon(x: torch.Tensor, base: StoredBase, bias: torch.Tensor | None, out: torch.Tensor,
                         tiles: ProductTiles) -> torch.Tensor:
    """out = x @ W.T * scale + bias for x [M, K] fp16/bf16 and an int8/fp8 base as stored; programs of
    tiles.block_n base rows by tiles.block_m (8..64) x rows, K cut in tiles.split_k ranges."""
    if base.form != ROW_SCALED:
        raise ValueError("the Gluon stored product reads int8 or fp8 bases (row scales) only")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Gluon stored product takes bf16 or fp16 activations, got {x.dtype}")
    sizes = (tiles.block_m, tiles.block_k, tiles.block_n)
    if not (all(next_pow2(size) == size for size in sizes) and 8 <= tiles.block_m <= MAX_COLS and tiles.block_k >= 16
            and tiles.block_n % (16 * tiles.num_warps) == 0 and not tiles.transposed):
        raise ValueError(f"Gluon product tiles take 8..{MAX_COLS} rows and K steps of 16+ (powers of two), 16 base rows "
                         "a warp and no transpose")
    m, k = x.shape
    n = base.values.shape[0]
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, tiles.block_m), tiles.split_k)
    partials, counters = split_buffers(out, grid)
    fast(_stored_product_kernel)[grid](
        x, base.values, base.scale, bias if bias is not None else out, out, partials, counters, m, n, k, x.stride(0),
        base.values.stride(0), out.stride(0), m * n, HAS_BIAS=bias is not None, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, COLS=tiles.block_m, SPLIT_K=tiles.split_k, num_warps=tiles.num_warps,
    )
    return out
