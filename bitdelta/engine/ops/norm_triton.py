"""Triton kernels of `norm.py` (GPU only; imported lazily): the residual add with the RMSNorm after it,
and SiLU-and-multiply, one launch each.

Both compute in fp32 and round where eager PyTorch rounds: the sum h + residual, the normalised
row, its product with the weight; SiLU(gate), its product with up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdelta.kernels.launch import fast

SILU_BLOCK = 1024


@triton.jit
def _add_rms_norm_kernel(
    h_ptr, residual_ptr, weight_ptr, weight_rows_ptr, h_out_ptr, x_ptr,
    H, eps, stride_h, stride_residual, stride_weight, stride_h_out, stride_x,
    HAS_RESIDUAL: tl.constexpr, ROW_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    dtype = x_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(dtype)
        tl.store(h_out_ptr + row * stride_h_out + offs, h, mask=mask)
    h = h.to(tl.float32)
    hidden = (h * tl.math.rsqrt(tl.sum(h * h, axis=0) / H + eps)).to(dtype)
    if ROW_WEIGHTS:
        weight_ptr += tl.load(weight_rows_ptr + row).to(tl.int64) * stride_weight
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    tl.store(x_ptr + row * stride_x + offs, (w.to(tl.float32) * hidden.to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, I, stride_gate, stride_up, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype)
    tl.store(out_ptr + row * stride_out + offs, (silu.to(tl.float32) * u).to(dtype), mask=mask)


def add_rms_norm_triton(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        weight_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, hidden = h.shape
    per_row = weight_rows is not None
    if weight.shape[-1] != hidden or weight.dim() != (2 if per_row else 1) or weight.stride(-1) != 1 \
            or h.stride(1) != 1 or (residual is not None and (residual.shape != h.shape or residual.stride(1) != 1)) \
            or (per_row and weight_rows.shape != (rows,)):
        raise ValueError(f"add_rms_norm: h and residual [T, H] with unit stride along H, weight [H] or a table [E, H] "
                         f"with weight_rows [T] expected; got h {tuple(h.shape)}, weight {tuple(weight.shape)}")
    h_out = h if residual is None else torch.empty_like(h)
    x = torch.empty_like(h)
    if rows == 0:
        return h_out, x
    block = triton.next_power_of_2(hidden)
    fast(_add_rms_norm_kernel)[(rows,)](
        h, residual if residual is not None else h, weight, weight_rows if per_row else h, h_out, x,
        hidden, eps, h.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0) if per_row else 0,
        h_out.stride(0), x.stride(0),
        HAS_RESIDUAL=residual is not None, ROW_WEIGHTS=per_row, BLOCK=block, num_warps=min(max(block // 512, 1), 16),
    )
    return h_out, x


def silu_and_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dim() != 2 or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError(f"silu_and_mul: gate and up [T, I] with unit stride along I expected; got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}")
    rows, inner = gate.shape
    out = torch.empty(rows, inner, dtype=gate.dtype, device=gate.device)
    if rows == 0:
        return out
    fast(_silu_and_mul_kernel)[(rows, triton.cdiv(inner, SILU_BLOCK))](
        gate, up, out, inner, gate.stride(0), up.stride(0), out.stride(0), BLOCK=SILU_BLOCK, num_warps=4,
    )
    return out
