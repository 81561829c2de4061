"""Triton kernel for the multi-tenant 1-bit delta linear (GPU only; imported lazily).

One kernel serves decode and prefill; only its tile shapes differ (see `configs.py`). The rows of
the batch are grouped by slot (`grouping.py`) and cut into tiles that never mix slots. A program
takes one (row tile, column block) pair and walks K once (with `split_k`, one of that many ranges of
K; the last of the tile's programs to arrive adds their fp32 partials in split order and writes y):

    acc_base += x_tile @ W_base[cols].T                  (fused variant only)
    acc_sign += x_tile @ expand(bits[slot, cols]).T      (skipped for slot -1)
    y[rows, cols] = acc_base + bias + scale[slot, cols] * acc_sign

so each tile reads its slot's packed bits once, whatever the number of its rows. In the unfused
form (fuse_base=False) the base product comes from cuBLAS as fp32 (`ws`) and the kernel adds the delta to it;
that pays when many distinct slots would otherwise each re-read the base columns.

Signs are expanded to exact +-1 values in the activation dtype and multiplied on the tensor cores
(`tl.dot`, fp32 accumulation). Tiles of up to 64 rows of a slot with the base from cuBLAS
take the Gluon kernels of `decode_bitmma.py` instead (config `bitmma`), whose expansion costs one
instruction per weight (v8 in benchmarks/KERNEL_NOTES.md), half that for one-row tiles (v9, int8).
Batches of at most 4 rows can instead take `_gemv_kernel` (config `gemv`): the whole batch in one
program per column block, base and delta fused on the CUDA cores. Prefill segments of hundreds of
rows take `triton_merge.py` (config `merged_gemm`: merged weights written once, then cuBLAS).
`SWAP_AB` (with MERGE) computes a tile's product transposed, acc[cols, rows] += w'[cols, k] . x[rows,
k]^T: the merged weights built in registers are then wgmma's A operand straight from registers,
where as the B operand Triton would stage them through shared memory and wait on every product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.configs import KernelConfig
from bitdelta.kernels.grouping import SlotPlan, row_slots, segment_tiles
from bitdelta.kernels.launch import fast

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


@triton.jit
def _tile_rows_cols(tiles_ptr, order_ptr, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile (grid axis 0: slot, first and end of its rows in the sorted order) and
    column block (axis 1): the slot, the batch rows it covers and the output columns, with masks."""
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    r = first + tl.arange(0, ROWS)
    row_mask = r < end
    rows = tl.load(order_ptr + r, mask=row_mask, other=0).to(tl.int64)  # rows x strides may pass 2^31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slot, rows, row_mask, cols, cols < N


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
    x_ptr, w_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, order_ptr, rslot_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sg_s, stride_sg_n, stride_sc_s, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ROWS: tl.constexpr, SAME_SLOT: tl.constexpr,
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
    """
    G: tl.constexpr = BLOCK_K // 8
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    g = tl.arange(0, G)
    e = tl.arange(0, 8)
    kk = tl.arange(0, BLOCK_K)
    # W and x are loaded as 2-D [.., BLOCK_K] tiles (K the fastest axis across lanes: each warp
    # reads 512 contiguous bytes of a row) and reshaped to [.., G, 8] in registers.
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + kk[None, :]
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
        kmask = ((k0 + kk) < K) | EVEN_K
        xmask = ((k0 + koff) < K) | EVEN_K
        wmask = (((k0 + g * 8) < K) | EVEN_K)[None, :]
        w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & kmask[None, :], other=0.0)
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


@triton.jit
def _segment_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, signs_ptr, scales_ptr, y_ptr, tiles_ptr, order_ptr, partials_ptr, counters_ptr,
    N, K, KW,
    stride_xm, stride_wn, stride_wsm, stride_sg_s, stride_sg_n, stride_sc_s, stride_ym, stride_ps,
    HAS_BIAS: tl.constexpr, FUSE_BASE: tl.constexpr, MERGE: tl.constexpr, EVEN_K: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # MERGE (fused only): one product with the tile's merged weights, bf16/fp16(W + scale * sign), the
    # very weights `bitdelta merge` writes, instead of a base product and a sign product: half the
    # tensor-core work for one extra rounding of each weight.
    # Tiles vary fastest, so the programs sharing a column block (and its base columns) run
    # together and the base is read from DRAM about once.
    slot, rows, row_mask, cols, col_mask = _tile_rows_cols(tiles_ptr, order_ptr, N, ROWS, BLOCK_N)

    if SWAP_AB:  # merged only: acc_t[cols, rows] += merged . x^T, merged being wgmma's register operand
        acc_t = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    else:
        acc_base = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_sign = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    has_delta = slot >= 0
    sign_rows = signs_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_sg_s + cols[:, None] * stride_sg_n
    if MERGE:  # zero for a base-only tile: its merged weights are the base's, bit for bit
        merge_scale = tl.load(scales_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_sc_s + cols,
                              mask=col_mask & has_delta, other=0.0)
    k_first, k_end = _k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_first, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = (ks < K) | EVEN_K  # EVEN_K: no tail, and no per-element K compares
        # Zero activations past K neutralise the padding bits (0 -> -1) of the last word.
        xk = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if FUSE_BASE:
            wk = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :],
                         mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        # No branch on slot >= 0 here: loads under a branch are not software-pipelined (measured:
        # 2x slower). A base-only tile reads no bits (masked) and discards its delta product.
        kw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        words = tl.load(sign_rows + kw[None, :], mask=has_delta & col_mask[:, None] & (kw < KW)[None, :], other=0)
        if MERGE:
            merged = merge_tile(wk, merge_scale, words, xk.dtype)
            if SWAP_AB:
                acc_t += tl.dot(merged, tl.trans(xk))
            else:
                acc_base += tl.dot(xk, tl.trans(merged))
        else:
            if FUSE_BASE:
                acc_base += tl.dot(xk, tl.trans(wk))
            acc_sign += tl.dot(xk, tl.trans(expand_signs(words, xk.dtype)))

    if SWAP_AB:
        acc_base = tl.trans(acc_t)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT_K == 1:  # the base (cuBLAS's, or this pass's), the bias, then the delta
        if not FUSE_BASE:
            acc_base = _tile(ws_ptr, rows, cols, stride_wsm, out_mask)
        acc_base = _add_bias(acc_base, bias_ptr, cols, col_mask, HAS_BIAS)
        if has_delta and not MERGE:
            acc_base += _delta_scale(scales_ptr, slot, cols, col_mask, stride_sc_s)[None, :] * acc_sign
        _store_y(acc_base, y_ptr, rows, cols, stride_ym, out_mask)
    else:
        # this program's share of K; the last of the tile's SPLIT_K programs to arrive adds them up
        if has_delta and not MERGE:
            acc_base += _delta_scale(scales_ptr, slot, cols, col_mask, stride_sc_s)[None, :] * acc_sign
        partials = partials_ptr + rows[:, None] * N + cols[None, :]
        stride_ps = stride_ps.to(tl.int64)  # splits x M x N may pass 2^31
        tl.store(partials + tl.program_id(2) * stride_ps, acc_base, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        counter = counters_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):  # in split order: the sum does not depend on arrival
                total += tl.load(partials + split * stride_ps, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)  # ready for the next launch
            if not FUSE_BASE:
                total += _tile(ws_ptr, rows, cols, stride_wsm, out_mask)
            total = _add_bias(total, bias_ptr, cols, col_mask, HAS_BIAS)
            _store_y(total, y_ptr, rows, cols, stride_ym, out_mask)


@triton.jit
def _k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K range of this program (grid axis 2 with split-K): whole BLOCK_K steps, the last range shorter."""
    first = 0
    end = K
    if SPLIT_K > 1:
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        first = tl.program_id(2) * per_split
        end = tl.minimum(K, first + per_split)
    return first, end


@triton.jit
def _tile(ptr, rows, cols, stride_m, mask):
    """An fp32 [rows, cols] tile of a row-major matrix (cuBLAS's base product `ws`)."""
    return tl.load(ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_y(acc, y_ptr, rows, cols, stride_ym, mask):
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_bias(acc, bias_ptr, cols, col_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _delta_scale(scales_ptr, slot, cols, col_mask, stride_sc_s):
    return tl.load(scales_ptr + slot.to(tl.int64) * stride_sc_s + cols, mask=col_mask, other=0.0)


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
    if config.gemv:
        if m > config.rows:
            raise ValueError(f"the gemv variant takes the whole batch in one program: {m} rows > rows={config.rows}")
        weight = base_weight if base_weight.stride(1) == 1 else base_weight.contiguous()
        fast(_gemv_kernel)[(triton.cdiv(n, config.block_n),)](
            x, weight, bias if bias is not None else y, signs, scales, y, plan.order, row_slots(plan),
            m, n, k,
            x.stride(0), weight.stride(0), signs.stride(0), signs.stride(1), scales.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0, ROWS=config.rows,
            SAME_SLOT=len(plan.host_slots) == 1, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            NUM_STAGES=config.num_stages, num_warps=config.num_warps,
        )
        return y
    if config.merged_gemm:
        from bitdelta.kernels.triton_merge import merged_gemm

        return merged_gemm(x, base_weight, signs, scales, plan, bias, config, y)
    if config.fuse_base:
        ws = y  # unused: the kernel computes the base product itself
        weight = base_weight if base_weight.stride(1) == 1 else base_weight.contiguous()
    else:
        ws = torch.mm(x, base_weight.t(), out_dtype=torch.float32)  # cuBLAS, fp32 out: one rounding
        weight = x  # unused
    if config.bitmma:
        from bitdelta.kernels.decode_bitmma import bitmma_delta  # Gluon: imported only on this path

        return bitmma_delta(x, ws, bias, signs, scales, plan, config, y)
    tiles = segment_tiles(plan, config.rows)
    grid = (tiles.shape[0], triton.cdiv(n, config.block_n), config.split_k)
    if config.split_k > 1:
        partials = torch.empty(config.split_k, m, n, dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, grid[0] * grid[1])
    else:
        partials = counters = y  # unused
    fast(_segment_kernel)[grid](
        x, weight, ws, bias if bias is not None else y, signs, scales, y, tiles, plan.order, partials, counters,
        n, k, signs.shape[-1],
        x.stride(0), weight.stride(0), ws.stride(0), signs.stride(0), signs.stride(1), scales.stride(0),
        y.stride(0), m * n,
        HAS_BIAS=bias is not None, FUSE_BASE=config.fuse_base, MERGE=config.merge, EVEN_K=k % config.block_k == 0,
        ROWS=config.rows, SWAP_AB=config.swap_ab, SPLIT_K=config.split_k,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


_split_counters: dict[torch.device, torch.Tensor] = {}
_retired_counters: list[torch.Tensor] = []


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 arrival counters of the split-K kernels on `device`. Each launch
    leaves them at zero again, so one buffer serves every call: no memset a call. Calls on one stream
    (the engine's, and graph replays of it) take turns; two streams must not run split-K calls at once
    (a counter left off zero would spoil every later call that uses it). Grown only outside CUDA-graph
    capture (the engine's eager pass before each capture allocates it); a buffer that is outgrown is
    kept, since graphs captured earlier and kernels still queued hold its address."""
    counters = _split_counters.get(device)
    if counters is None or counters.numel() < count:
        if device.type == "cuda":
            with torch.cuda.device(device):
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("split-K counters must be allocated before CUDA-graph capture: "
                                       "run the call once eagerly first")
        if counters is not None:
            _retired_counters.append(counters)
        counters = _split_counters[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return counters
