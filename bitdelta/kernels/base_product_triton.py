"""The product over a quantized base read as stored (GPU only; imported lazily by `base_product.py`):
out = x @ W.T + bias with W's stored values fed to the tensor cores in x's dtype and the scales
applied to sums: row scales (int8, fp8) multiply the fp32 accumulator once, and an int4 base is
summed a scale group at a time (`_nibble_product`). A program per (row block, column block, range
of K); row blocks vary fastest, so the programs sharing a column block run together and W is read
from DRAM about once. K is split where the tiles alone would leave SMs idle (`split_k.py`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.base_product import ProductTiles, StoredBase, product_tiles
from bitdelta.kernels.base_tiles_triton import (GROUP, GROUP_SCALED, PLAIN, ROW_SCALED, base_tile, nibble_values, stored_values,
                                               x_halves)
from bitdelta.kernels import sm_count
from bitdelta.kernels.launch import fast
from bitdelta.kernels.paths.problem import H100_SMS
from bitdelta.kernels.split_k import split_buffers
from bitdelta.kernels.split_k_triton import k_range, sum_of_splits


@triton.jit
def _nibble_product(x_rows, row_mask, w_ptr, scale_ptr, cols, col_mask, k0, K, stride_w, stride_scale,
                    EVEN_K: tl.constexpr, SPAN: tl.constexpr, TRANSPOSED: tl.constexpr):
    """x[:, k0:k0+SPAN] @ W[cols, k0:k0+SPAN].T over an int4 base, the span inside one scale group: x's
    even and odd columns times the low and high nibbles (integers, exact in x's dtype), then the
    group's scales. The weights are neither interleaved nor scaled one by one: the column order moves
    to x, a small tile, and the scale to the partial sums."""
    x_even, x_odd = x_halves(x_rows, row_mask, k0, K, SPAN, EVEN_K)
    low, high, scale = nibble_values(w_ptr, scale_ptr, cols, col_mask, k0, K, stride_w, stride_scale, SPAN, EVEN_K,
                                     x_even.dtype)
    if TRANSPOSED:
        part = tl.dot(high, tl.trans(x_odd), tl.dot(low, tl.trans(x_even))) * scale[:, None]
    else:
        part = tl.dot(x_odd, tl.trans(high), tl.dot(x_even, tl.trans(low))) * scale[None, :]
    return part


@triton.jit
def _stored_product_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, partials_ptr, counters_ptr, M, N, K, stride_xm,
                           stride_wn, stride_ws, stride_om, stride_ps, FORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                           EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           TRANSPOSED: tl.constexpr, SPLIT_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    cols64 = cols.to(tl.int64)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    if TRANSPOSED:  # acc_t[cols, rows] += w . x^T: the dequantized tile is the mma's register operand
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    SPAN: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP  # int4: K steps within one scale group
    k_first, k_end = k_range(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_first, k_end, BLOCK_K):
        if FORM == GROUP_SCALED:
            for g in tl.static_range(0, BLOCK_K, SPAN):
                part = _nibble_product(x_rows, row_mask, w_ptr, w_scale_ptr, cols64, col_mask, k0 + g, K, stride_wn, stride_ws,
                                       EVEN_K, SPAN, TRANSPOSED)
                if TRANSPOSED:
                    acc_t += part
                else:
                    acc += part
        else:  # ROW_SCALED: the stored values as they are, the row scales after the sum
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = (ks < K) | EVEN_K
            xk = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wk = base_tile(w_ptr, w_scale_ptr, cols64, col_mask, k0, K, stride_wn, stride_ws, BLOCK_K, EVEN_K, PLAIN)
            wk = stored_values(wk, xk.dtype)
            if TRANSPOSED:
                acc_t += tl.dot(wk, tl.trans(xk))
            else:
                acc += tl.dot(xk, tl.trans(wk))
    if TRANSPOSED:
        acc = tl.trans(acc_t)
    if FORM == ROW_SCALED:
        acc *= tl.load(w_scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT_K == 1:
        _store_out(acc, bias_ptr, out_ptr, rows, cols, col_mask, stride_om, out_mask, HAS_BIAS)
    else:
        last, total = sum_of_splits(acc, partials_ptr, counters_ptr, rows, cols, N, stride_ps, out_mask, SPLIT_K)
        if last:
            _store_out(total, bias_ptr, out_ptr, rows, cols, col_mask, stride_om, out_mask, HAS_BIAS)


@triton.jit
def _store_out(acc, bias_ptr, out_ptr, rows, cols, col_mask, stride_om, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def stored_product(x: torch.Tensor, base: StoredBase, bias: torch.Tensor | None, out_dtype: torch.dtype,
                   tiles: ProductTiles | None = None) -> torch.Tensor:
    """x @ W.T + bias in `out_dtype` for x [M, K] fp16/bf16 and a quantized base read as stored, on
    `tiles` (default: `product_tiles`)."""
    x = x.contiguous()
    m, k = x.shape
    n = base.values.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    t = tiles or product_tiles(m, n, sm_count(x.device.index) if x.is_cuda else H100_SMS, base.form)  # interpreter: an H100's
    if t.gluon:
        from bitdelta.kernels.base_product_gluon import stored_product_gluon

        return stored_product_gluon(x, base, bias, out, t)
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), t.split_k)
    partials, counters = split_buffers(out, grid)
    fast(_stored_product_kernel)[grid](
        x, base.values, base.scale, bias if bias is not None else out, out, partials, counters, m, n, k, x.stride(0),
        base.values.stride(0), base.scale_stride, out.stride(0), m * n, FORM=base.form, HAS_BIAS=bias is not None,
        EVEN_K=k % t.block_k == 0, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, TRANSPOSED=t.transposed,
        SPLIT_K=t.split_k, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out
