"""Merged weights on the GPU, and the prefill path built on them (Triton; imported lazily).

A slot's fine-tune weight is base + scale * sign, rounded once to the base's dtype: exactly what
`bitdelta merge` writes (`reference.merged_weight`). Where a slot has hundreds of rows (prefill of a
prompt), writing that matrix once and handing it to cuBLAS beats every fused pass: the merge streams
3 bytes per weight (base in, bits, merged out) once, while a fused kernel re-expands the bits for
every tile of rows and cannot keep up with cuBLAS's tensor-core schedule (KERNEL_NOTES round 8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.configs import KernelConfig
from bitdelta.kernels.grouping import SlotPlan
from bitdelta.kernels.launch import fast
from bitdelta.kernels.triton_segments import merge_tile


@triton.jit
def _merge_kernel(w_ptr, signs_ptr, scales_ptr, out_ptr, N, K, KW, stride_wn, stride_sg_n, stride_on,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = dtype(w[n, k] + scale[n] * sign[n, k]) for one [BLOCK_N, BLOCK_K] tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kw = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    row_mask = rows < N
    mask = row_mask[:, None] & (ks < K)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rows64 * stride_wn + ks[None, :], mask=mask, other=0.0)
    words = tl.load(signs_ptr + rows64 * stride_sg_n + kw[None, :], mask=row_mask[:, None] & (kw < KW)[None, :],
                    other=0)
    scale = tl.load(scales_ptr + rows, mask=row_mask, other=0.0)
    merged = merge_tile(w, scale, words, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64 * stride_on + ks[None, :], merged, mask=mask)


def merge_weight(base_weight: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, slot: int,
                 config: KernelConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.merged_weight` on the GPU: [N, K] in base_weight's dtype (row-major whatever the
    base's layout), into `out` if given (row-major [N, K])."""
    n, k = base_weight.shape
    if out is None:
        out = torch.empty(n, k, dtype=base_weight.dtype, device=base_weight.device)
    elif out.shape != (n, k) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [{n}, {k}] tensor, got shape {tuple(out.shape)} strides {out.stride()}")
    weight = base_weight if base_weight.stride(1) == 1 else base_weight.contiguous()
    slot_signs = signs[slot].contiguous()
    slot_scales = scales[slot].to(torch.float32).contiguous()
    fast(_merge_kernel)[(triton.cdiv(n, config.block_n), triton.cdiv(k, config.block_k))](
        weight, slot_signs, slot_scales, out, n, k, slot_signs.shape[1], weight.stride(0), slot_signs.stride(0),
        out.stride(0), BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )
    return out


def merged_gemm(x: torch.Tensor, base_weight: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor,
                plan: SlotPlan, bias: torch.Tensor | None, config: KernelConfig, y: torch.Tensor) -> torch.Tensor:
    """y = x @ W'[slot].T + bias segment by segment, W' merged once per slot per call (one scratch
    matrix, reused); slot -1 rows take the base weight itself. Each segment's product is written into
    its slice of y; rows not already grouped by slot are gathered into slot order first and
    scattered back at the end."""
    if base_weight.stride(1) != 1:  # once, not per slot
        base_weight = base_weight.contiguous()
    order = None if plan.in_order else plan.order.long()
    x_sorted = x if plan.in_order else x.index_select(0, order)
    y_sorted = y if plan.in_order else torch.empty_like(y)
    scratch = None
    start = 0
    for slot, count in zip(plan.host_slots, plan.counts):
        if slot < 0:
            weight = base_weight
        else:
            scratch = merge_weight(base_weight, signs, scales, slot, config, out=scratch)
            weight = scratch
        rows = slice(start, start + count)
        if bias is None:
            torch.mm(x_sorted[rows], weight.t(), out=y_sorted[rows])
        else:
            torch.addmm(bias, x_sorted[rows], weight.t(), out=y_sorted[rows])
        start += count
    if not plan.in_order:
        y.index_copy_(0, order, y_sorted)
    return y
