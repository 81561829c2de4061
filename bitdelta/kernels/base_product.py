"""The base weight as the kernels read it (`stored`), and the base's share of a product, x @ W.T.

A quantized base (`bitdelta.quant`) is read as stored by every kernel path and dequantized in
registers (`base_tiles_triton.py`): int8 and fp8 values times their row's scale, int4 nibbles times
their group's (the tensor-core kernels keep an int4 tile's even and odd columns apart). The paths that add a delta to the base's fp32 product (DOT, BITMMA)
and the base-only path (DENSE) take it from `base_product`: cuBLAS for a plain base, a Triton
product over the stored tiles (`base_product_triton.py`) for a quantized one; with row scales that
product scales its fp32 accumulator once, since (x @ Q.T) * s = x @ (Q * s).T when s scales output
columns. Its tiles (`product_tiles`) are chosen here, in plain Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class ProductTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    transposed: bool  # acc^T += W x^T: the dequantized tile is the mma's register operand
    split_k: int = 1  # K cut into this many ranges of whole block_k steps, a program each (`split_k.py`)
    gluon: bool = False  # int8/fp8 only, up to 64 rows: `base_product_gluon` (not dispatched; timed by the sweep)


def product_tiles(m: int, n: int, sms: int, form: int = ROW_SCALED) -> ProductTiles:
    """Decode batches (up to 64 rows) take one row block. Up to 32 rows: 32-column blocks, K steps of
    128 four stages deep; past 32 rows every column block re-reads x from L2, so over int8 and fp8 the
    blocks widen to 128 columns (8 warps). K is split in 4 or 2 where the column blocks alone would
    leave SMs without enough work (`_split_for`): without it a 4096-wide layer at one row ran 128
    programs, 1.4x its pure read. Measured side by side on an H100 over an int8 base, Llama-2 7B/70B
    shapes at 1, 16 and 64 rows (`python -m benchmarks.quantized_base --product-tiles`,
    quantized_base_product_tiles.md): within 1.12x of the best of 32 tilings everywhere (1.03x on
    average), where the rule before K splits took up to 1.42x (1.17x); 17-32 rows, not in that sweep,
    take the 16-row rule with 32-row blocks. Over int4 (two dots a scale group) past 32 rows the blocks
    stay 32 columns wide, unsplit: 1.22-1.74x the bf16 time at 64 rows in quantized_base.md, where the
    128-column blocks took 1.45-2.16x (both before the nibbles were made from bits, `nibble_values`: not
    re-swept since). Prompts take square tensor-core tiles, transposed."""
    if m > 64:
        return ProductTiles(128, 128, 64, 8, 3, True)
    if m > 32 and form == GROUP_SCALED:
        return ProductTiles(64, 32, 128, 4, 4, False)
    if m > 32:
        tiles, target = ProductTiles(64, 128, 128, 8, 3, False), 1.5 * sms
    else:
        tiles, target = ProductTiles(max(16, 1 << (m - 1).bit_length()), 32, 128, 4, 4, False), 4 * sms
    return replace(tiles, split_k=_split_for(-(-n // tiles.block_n), target))


def _split_for(programs: int, target: float) -> int:
    """The most ranges of K (4, 2, 1) that keep `programs` column blocks times it within `target`."""
    return next((split for split in (4, 2) if programs * split <= target), 1)


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
