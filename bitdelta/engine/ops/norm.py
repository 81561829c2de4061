"""The elementwise steps between a decoder layer's linears: the residual add with the RMSNorm after it,
and SwiGLU's SiLU-and-multiply. Public entry points and their references.

    h, x = add_rms_norm(h, residual, weight, eps, weight_rows=None)
    a = silu_and_mul(gate, up)

`add_rms_norm` is `h = h + residual` (skipped for residual None), then LlamaRMSNorm's arithmetic:
`weight * F.rms_norm(h)` (normalised in fp32, rounded to h's dtype, times the weight). `weight` is [H],
or a table [E, H] of which row t takes entry weight_rows[t] (each request's own fine-tune).
`silu_and_mul` is `F.silu(gate) * up`. The references are those PyTorch ops, the CPU path.

On a CUDA fp16/bf16 tensor with Triton they run one kernel each (`norm_triton.py`) where eager
PyTorch takes three to five (add, norm, the weight's gather and product; SiLU, product): fewer launches
in every serving step, and fewer Python calls in eager ones, whose host time is the step's time
(docs/kernels.md). The kernels round where PyTorch does; their fp32 normaliser
and exponential may differ from PyTorch's in the last fp32 bit, so an element may differ by an ulp of
the activation dtype (tests/test_norm.py).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def add_rms_norm_reference(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           weight_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        h = h + residual
    own = weight if weight_rows is None else weight[weight_rows]
    return h, own * F.rms_norm(h, h.shape[-1:], eps=eps)


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def add_rms_norm(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 weight_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + residual, its RMSNorm times the weight) for h [T, H]; see the module docstring."""
    from bitdelta.kernels import on_triton

    if on_triton(h) and weight.dtype == h.dtype and (residual is None or residual.dtype == h.dtype):
        from bitdelta.engine.ops.norm_triton import add_rms_norm_triton

        return add_rms_norm_triton(h, residual, weight, eps, weight_rows)
    return add_rms_norm_reference(h, residual, weight, eps, weight_rows)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate, up [T, I] (views of one stacked projection are fine)."""
    from bitdelta.kernels import on_triton

    if on_triton(gate):
        from bitdelta.engine.ops.norm_triton import silu_and_mul_triton

        return silu_and_mul_triton(gate, up)
    return silu_and_mul_reference(gate, up)
