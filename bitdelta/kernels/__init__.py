"""Multi-tenant 1-bit delta matmul: the public entry point.

    y = bitdelta_matmul(x, base_weight, signs, scales, slot_ids, bias=None, plan=None)

computes, for rows x_i tagged with delta slots t_i (-1 = base only),
y_i = x_i @ W_base.T + bias + scales[t_i] * (x_i @ sign[t_i].T) (see `reference.py`).

On a CUDA fp16/bf16 tensor with Triton installed it runs the kernel path `paths.choose` picks for
the call's shape and rows (`paths/`); otherwise (CPU, fp32 activations, no Triton) the pure-PyTorch
reference. Triton is imported only on that first GPU call, so the package imports on machines
without Triton or CUDA.

`plan` (from `build_plan(slot_ids)`) groups the rows by slot. It depends only on the slot ids, so
a model should build it once per forward step and pass it to every layer: that saves a host sync
and a sort per linear, and the path of each layer shape is chosen once a step. Without it, each
call builds its own. A batch mixing long segments (a prefill chunk) with short ones (decode rows)
is split in two (`paths.split_threshold`), each side on its own path (on views where its rows are
contiguous, else gathered and scattered back).
"""

from __future__ import annotations

import functools

import torch

from bitdelta.kernels import reference
from bitdelta.kernels.base_product import form_of, reads_as_stored
from bitdelta.kernels.grouping import SlotPlan, build_plan, split_plan

__all__ = ["SlotPlan", "bitdelta_matmul", "build_plan", "gluon_available", "on_triton", "sm_count", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def on_triton(x: torch.Tensor) -> bool:
    """Whether the kernels take the Triton path for activations `x`: a CUDA fp16/bf16 tensor, with
    Triton installed (otherwise the PyTorch references run)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available()


@functools.cache
def gluon_available() -> bool:
    """True when Triton has Gluon (every Triton the gpu extra admits, >= 3.6, has it), which the BITMMA path's kernels are written in."""
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        return False
    return True


def bitdelta_matmul(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    slot_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan: SlotPlan | None = None,
) -> torch.Tensor:
    """y [M, N] in x's dtype for x [M, K], base_weight [N, K], signs int32 [S, N, ceil(K/32)],
    scales fp32 [S, N], slot_ids int [M] (-1 = base only), bias [N] or None. A quantized base
    (bitdelta.quant.QuantizedWeight) is read as stored (`base_product.reads_as_stored`), else
    dequantized for the call."""
    if not on_triton(x):
        if not isinstance(base_weight, torch.Tensor):  # fp32, as the kernels dequantize in registers
            base_weight = base_weight.dequantize(torch.float32)
        return reference.bitdelta_matmul(x, base_weight, signs, scales, slot_ids, bias)
    from bitdelta.kernels.paths import split_threshold

    if plan is None:
        plan = build_plan(slot_ids)
    if not isinstance(base_weight, torch.Tensor) and not reads_as_stored(base_weight):
        base_weight = base_weight.dequantize(x.dtype)
    long_rows = split_threshold(plan)
    if long_rows is None:
        return _dispatch(x, base_weight, signs, scales, plan, bias)
    # a prefill chunk beside decode rows: each side on its own path, on views of x and y where its
    # rows are contiguous in the batch, else gathered and scattered back
    y = torch.empty(x.shape[0], base_weight.shape[0], dtype=x.dtype, device=x.device)
    for side in split_plan(plan, long_rows):
        if side.start is None:
            y.index_copy_(0, side.rows, _dispatch(x.index_select(0, side.rows), base_weight, signs, scales, side.plan, bias))
        else:
            span = slice(side.start, side.start + side.plan.num_rows)
            _dispatch(x[span], base_weight, signs, scales, side.plan, bias, out=y[span])
    return y


def _dispatch(x: torch.Tensor, base_weight: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, plan: SlotPlan,
              bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    from bitdelta.kernels.paths import plan_choice, run_path

    n, k = base_weight.shape
    path, tiles = plan_choice(plan, n, k, gluon_available(), sm_count(x.device.index), form_of(base_weight))
    return run_path(path, tiles, x, base_weight, signs, scales, plan, bias, out)


@functools.cache
def sm_count(device_index: int | None) -> int:
    """The SM count of a CUDA device, against which the path choice counts a call's programs."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
