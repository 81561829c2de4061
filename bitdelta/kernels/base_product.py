"""The base's share of a product, x @ W.T, for a plain or a quantized base weight.

A base quantized with one scale per output row (int8 or fp8, `bitdelta.quant`) is read as stored:
each kernel path widens its tiles to the activations' dtype in registers (int8 and fp8 e4m3 values
are exact in fp16/bf16) and applies the row scales in fp32, since (x @ Q.T) * s = x @ (Q * s).T
when s scales output columns. A 4-bit base (scales per group along K) is dequantized for the call.
The paths that add a delta to cuBLAS's fp32 base product (DOT, BITMMA) and the base-only path
(DENSE) take it from `base_product`: cuBLAS for a plain base, `base_product_triton` for a stored one.
"""

from __future__ import annotations

import torch

READ_AS_STORED = ("int8", "fp8")  # recipes whose stored values every kernel path reads directly


def reads_as_stored(base_weight) -> bool:
    """A quantized base weight (bitdelta.quant.QuantizedWeight) that the kernel paths read as stored."""
    return not isinstance(base_weight, torch.Tensor) and base_weight.recipe in READ_AS_STORED


def stored(base_weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values [N, K] row-major, fp32 row scales [N] or None for a plain base)."""
    if isinstance(base_weight, torch.Tensor):
        return (base_weight if base_weight.stride(1) == 1 else base_weight.contiguous()), None
    return base_weight.data.contiguous(), base_weight.scale.reshape(-1).contiguous()


def base_product(x: torch.Tensor, base_weight, out_dtype: torch.dtype = torch.float32,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) in `out_dtype`, rounded once from fp32."""
    if isinstance(base_weight, torch.Tensor):
        if out_dtype == x.dtype:
            return torch.nn.functional.linear(x, base_weight, bias)
        y = torch.mm(x, base_weight.t(), out_dtype=out_dtype)  # cuBLAS
        return y if bias is None else y.add_(bias)
    from bitdelta.kernels.base_product_triton import scaled_product

    values, row_scale = stored(base_weight)
    return scaled_product(x, values, row_scale, bias, out_dtype)
