"""The base weight as the kernels read it (`stored`), and the base's share of a product, x @ W.T.

A quantized base (`bitdelta.quant`) is read as stored by every kernel path and dequantized in
registers (`base_tiles_triton.py`): int8 and fp8 values times their row's scale, int4 nibbles times
their group's (the tensor-core kernels keep an int4 tile's even and odd columns apart). The paths that add a delta to the base's fp32 product (DOT, BITMMA)
and the base-only path (DENSE) take it from `base_product`: cuBLAS for a plain base, a Triton
product over the stored tiles (`base_product_triton.py`) for a quantized one; with row scales that
product scales its fp32 accumulator once, since (x @ Q.T) * s = x @ (Q * s).T when s scales output
columns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

PLAIN, ROW_SCALED, GROUP_SCALED = 0, 1, 2  # base_tiles_triton's forms
FORMS = {"int8": ROW_SCALED, "fp8": ROW_SCALED, "int4": GROUP_SCALED}


@dataclass(frozen=True)
class StoredBase:
    """A base weight as a kernel reads it: values [N, K] (int4: uint8 [N, K/2] padded to whole groups),
    row-major; fp32 scales, [N] (ROW_SCALED) or [N, groups] (GROUP_SCALED), None for PLAIN."""

    values: torch.Tensor
    scale: torch.Tensor | None
    form: int

    @property
    def scale_stride(self) -> int:
        """The scales' row stride (0 where there are none)."""
        if self.scale is None:
            return 0
        return 1 if self.scale.ndim == 1 else self.scale.stride(0)


def reads_as_stored(base_weight) -> bool:
    """A quantized base weight (bitdelta.quant.QuantizedWeight) that the kernel paths read as stored:
    every recipe, but fp8 only where the GPU has e4m3 loads (Ada, Hopper and later)."""
    if isinstance(base_weight, torch.Tensor) or base_weight.recipe not in FORMS:
        return False
    return base_weight.recipe != "fp8" or not base_weight.data.is_cuda or _has_fp8(base_weight.data.device.index)


@functools.cache
def _has_fp8(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def form_of(base_weight) -> int:
    """How the kernels read `base_weight`: PLAIN, ROW_SCALED or GROUP_SCALED."""
    return PLAIN if isinstance(base_weight, torch.Tensor) else FORMS[base_weight.recipe]


def stored(base_weight) -> StoredBase:
    form = form_of(base_weight)
    if form == PLAIN:
        return StoredBase(base_weight if base_weight.stride(-1) == 1 else base_weight.contiguous(), None, PLAIN)
    scale = base_weight.scale.reshape(-1) if form == ROW_SCALED else base_weight.scale
    return StoredBase(base_weight.data.contiguous(), scale.contiguous(), form)


def base_product(x: torch.Tensor, base_weight, out_dtype: torch.dtype = torch.float32,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) in `out_dtype`, rounded once from fp32."""
    if isinstance(base_weight, torch.Tensor):
        if out_dtype == x.dtype:
            return torch.nn.functional.linear(x, base_weight, bias)
        y = torch.mm(x, base_weight.t(), out_dtype=out_dtype)  # cuBLAS
        return y if bias is None else y.add_(bias)
    from bitdelta.kernels.base_product_triton import stored_product

    return stored_product(x, stored(base_weight), bias, out_dtype)
