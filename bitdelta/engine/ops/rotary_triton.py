"""Triton kernel of `rotary.py` (GPU only; imported lazily): rotary embedding of q and k and the
KV-cache write of k and v in one launch.

A program takes one (row, head): a query head is rotated into the output, a key head is rotated
into its pool row and the value head beside it copied. The rotation is computed in fp32 and rounded
once to the activation dtype (eager PyTorch rounds each product and the sum: the results differ by
at most an ulp of the dtype, tests/test_rotary.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.launch import fast


@triton.jit
def _rotary_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, key_pool_ptr, value_pool_ptr, rows_ptr,
    stride_q_row, stride_q_head, stride_k_row, stride_k_head, stride_v_row, stride_v_head,
    stride_cs_row, stride_out_row, stride_out_head, stride_pool_row, stride_pool_head,
    Q_HEADS, HALF: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    dtype = q_out_ptr.dtype.element_ty
    cs = row.to(tl.int64) * stride_cs_row + d
    c1 = tl.load(cos_ptr + cs, mask=ok).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF, mask=ok).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=ok).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + HALF, mask=ok).to(tl.float32)
    if head < Q_HEADS:
        src = q_ptr + row.to(tl.int64) * stride_q_row + head * stride_q_head + d
        dst = q_out_ptr + row.to(tl.int64) * stride_out_row + head * stride_out_head + d
    else:
        pool_row = tl.load(rows_ptr + row).to(tl.int64)
        src = k_ptr + row.to(tl.int64) * stride_k_row + (head - Q_HEADS) * stride_k_head + d
        dst = key_pool_ptr + pool_row * stride_pool_row + (head - Q_HEADS) * stride_pool_head + d
        value_src = v_ptr + row.to(tl.int64) * stride_v_row + (head - Q_HEADS) * stride_v_head + d
        value_dst = value_pool_ptr + pool_row * stride_pool_row + (head - Q_HEADS) * stride_pool_head + d
        tl.store(value_dst, tl.load(value_src, mask=ok), mask=ok)
        tl.store(value_dst + HALF, tl.load(value_src + HALF, mask=ok), mask=ok)
    x1 = tl.load(src, mask=ok).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok).to(tl.float32)
    tl.store(dst, (x1 * c1 - x2 * s1).to(dtype), mask=ok)  # x * cos + cat(-x2, x1) * sin, half by half
    tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(dtype), mask=ok)


def rotary_and_cache_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            key_pool: torch.Tensor, value_pool: torch.Tensor, write_rows: torch.Tensor) -> torch.Tensor:
    rows, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape != (rows, kv_heads, dim) or key_pool.shape != value_pool.shape \
            or key_pool.shape[1:] != (kv_heads, dim) or write_rows.shape != (rows,):
        raise ValueError(f"rotary: q [T, Hq, D], k and v [T, Hk, D], pools [rows, Hk, D] and write_rows [T] expected; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(key_pool.shape)}, "
                         f"{tuple(write_rows.shape)}")
    if dim % 2 or cos.shape != (rows, dim) or sin.stride() != cos.stride() or cos.stride(1) != 1:
        raise ValueError(f"rotary: cos and sin must be [{rows}, {dim}] with unit stride along the head, dim even")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or key_pool.stride() != value_pool.stride() \
            or key_pool.stride(2) != 1:
        raise ValueError("rotary: q, k, v and the pools need unit stride along the head dimension, pools alike")
    out = torch.empty(rows, q_heads, dim, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    fast(_rotary_cache_kernel)[(rows, q_heads + kv_heads)](
        q, k, v, cos, sin, out, key_pool, value_pool, write_rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), out.stride(0), out.stride(1), key_pool.stride(0), key_pool.stride(1),
        q_heads, HALF=dim // 2, BLOCK=triton.next_power_of_2(dim // 2), num_warps=1,
    )
    return out
