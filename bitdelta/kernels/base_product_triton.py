"""The product over a base stored quantized with row scales (GPU only; imported lazily by
`base_product.py`): out = (x @ Q.T) * s + bias, Q's tiles widened to x's dtype in registers for the
tensor cores, the row scales applied to the fp32 accumulator. A program per (row block, column
block); row blocks vary fastest, so the programs sharing a column block run together and Q is read
from DRAM about once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.launch import fast
from bitdelta.kernels.paths.problem import next_pow2


@triton.jit
def _scaled_product_kernel(x_ptr, q_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_om,
                           HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + cols.to(tl.int64)[:, None] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = (ks < K) | EVEN_K
        xk = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        qk = tl.load(q_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(xk, tl.trans(qk.to(xk.dtype)))
    acc *= tl.load(s_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def product_tiles(m: int, n: int) -> tuple[int, int, int, int, int]:
    """(block_m, block_n, block_k, num_warps, num_stages): decode batches (up to 64 rows) take one row
    block, column blocks narrow enough to give every SM a program, and long K steps (the product is
    a read of Q); prompts take square tensor-core tiles."""
    if m > 64:
        return 128, 128, 64, 8, 3
    block_n = 64 if triton.cdiv(n, 64) >= 132 else 32
    return max(16, next_pow2(m)), block_n, 256, 4, 3


def scaled_product(x: torch.Tensor, values: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """(x @ values.T) * row_scale + bias in `out_dtype`, for x [M, K] fp16/bf16 and values [N, K] int8 or
    float8_e4m3fn, row-major."""
    x = x.contiguous()
    m, k = x.shape
    n = values.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k, warps, stages = product_tiles(m, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    fast(_scaled_product_kernel)[grid](
        x, values, row_scale, bias if bias is not None else out, out, m, n, k, x.stride(0), values.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out
