"""Quantized bases: deterministic round-to-nearest recipes for the base's block linears.

A delta made over a quantized base is taken against the dequantized base, so the served model is
exactly Q(base) + scale * sign (the paper's quantized-base setting). Three recipes:

- `int8`: symmetric per output channel, scale = max|row| / 127.
- `fp8`: float8 e4m3 per output channel, scale = max|row| / 448 (e4m3's largest value).
- `int4`: symmetric in groups of 128 along each row, scale = max|group| / 7, two values a byte.

Only the block matrices are quantized, the ones `compress` makes 1-bit by default (the block
linears and the experts' matrices; embeddings, norms, lm_head and routers stay as they are); the
caller names them. Every recipe quantizes each row on its own, so a matrix's rows quantize alike
whether stored alone, stacked with others, or fused into a model's [E, N, K] expert tensor. A quantized base is a base of its own: its fingerprint
mixes the base's with the recipe and the names, so a delta made for one recipe is refused on a
base quantized by another, by the fingerprint check every reader already makes.

The recipes are written here rather than taken from torchao or compressed-tensors: each is a few
lines of PyTorch, the result must be bit-identical on every machine (compress on a CPU, serve on a
GPU), and the multi-tenant kernels read the stored layout directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from bitdelta.errors import BitDeltaError

# weights a row-block loop takes at a time (quantize, QuantizedBase.mapped, apply.applied_delta): 16 MB fp32 temporaries;
# 1M-element blocks took twice the CPU time on 2 busy cores
ROW_BLOCK_ELEMENTS = 1 << 22

RECIPES = ("int8", "fp8", "int4")
GROUP = 128  # int4 group size along K
_FP8_MAX = 448.0
_RECIPE_VERSION = 1  # bumped if a recipe's arithmetic changes: deltas made for the old one are then refused


@dataclass(frozen=True)
class QuantizedWeight:
    """One [N, K] matrix in a recipe's storage: int8 [N, K], float8_e4m3fn [N, K] or uint8 [N, K/2]
    (int4, two values a byte, low nibble first), with fp32 scales [N, 1] or [N, groups]."""

    recipe: str
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The quantized matrix [N, K] (computed in fp32, returned in `dtype`)."""
        n, k = self.shape
        if self.recipe == "int4":
            low, high = (self.data & 0xF).to(torch.int8), (self.data >> 4).to(torch.int8)
            values = torch.stack([low, high], dim=-1).flatten(-2) - 8  # stored offset by 8: 0..15 -> -8..7
            groups = values.float().view(n, -1, GROUP) * self.scale.unsqueeze(-1)
            return groups.flatten(1)[:, :k].to(dtype)
        return (self.data.float() * self.scale).to(dtype)

    def rows(self, rows: slice) -> QuantizedWeight:
        """Rows `rows` of the matrix (views: every recipe quantizes each row on its own)."""
        count = len(range(*rows.indices(self.shape[0])))
        return QuantizedWeight(self.recipe, self.data[rows], self.scale[rows], (count, self.shape[1]))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(self.recipe, self.data.to(device), self.scale.to(device), self.shape)


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise BitDeltaError(f"unknown base quantization {recipe!r}; use one of {', '.join(RECIPES)}")
    return recipe


def quantize(weight: torch.Tensor, recipe: str, row_absmax: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest `weight` [N, K] in fp32 arithmetic (deterministic on any device). int8 and fp8
    scale each row by `row_absmax` [N, 1] where given: the whole row's, when `weight` holds a share of
    its columns (tensor parallel), so the share quantizes as it does inside the whole matrix. Every
    recipe quantizes a row on its own, so a block of rows at a time: the fp32 temporaries stay
    ROW_BLOCK_ELEMENTS weights whatever the matrix (a 70B layer's are GBs whole)."""
    check_recipe(recipe)
    n, k = weight.shape
    step = max(1, ROW_BLOCK_ELEMENTS // max(k, 1))
    if n <= step:
        return _quantize_rows(weight, recipe, row_absmax)
    data = scale = None
    for start in range(0, n, step):
        rows = slice(start, start + step)
        block = _quantize_rows(weight[rows], recipe, None if row_absmax is None else row_absmax[rows])
        if data is None:  # the recipe's storage, for all n rows
            data = block.data.new_empty((n, *block.data.shape[1:]))
            scale = block.scale.new_empty((n, *block.scale.shape[1:]))
        data[rows], scale[rows] = block.data, block.scale
    return QuantizedWeight(recipe, data, scale, (n, k))


def _quantize_rows(weight: torch.Tensor, recipe: str, row_absmax: torch.Tensor | None) -> QuantizedWeight:
    w = weight.detach().float()
    n, k = w.shape
    if recipe == "int4":
        padded = torch.nn.functional.pad(w, (0, -k % GROUP)).view(n, -1, GROUP)
        scale = _scale(padded.abs().amax(dim=-1), 7.0)
        values = (padded / scale.unsqueeze(-1)).round().clamp(-8, 7).to(torch.int8).flatten(1) + 8
        pairs = values.to(torch.uint8).view(n, -1, 2)
        return QuantizedWeight(recipe, pairs[..., 0] | (pairs[..., 1] << 4), scale, (n, k))
    amax = w.abs().amax(dim=1, keepdim=True) if row_absmax is None else row_absmax.to(w)
    scale = _scale(amax, 127.0 if recipe == "int8" else _FP8_MAX)
    if recipe == "int8":
        return QuantizedWeight(recipe, (w / scale).round().clamp(-127, 127).to(torch.int8), scale, (n, k))
    return QuantizedWeight(recipe, (w / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), scale, (n, k))


def _scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    """amax / top, with all-zero rows (or groups) given scale 1 so they dequantize to zeros."""
    return torch.where(amax > 0, amax / top, torch.ones_like(amax))


def quantized_fingerprint(base_fingerprint: str, recipe: str, names: Iterable[str]) -> str:
    """The fingerprint of the base quantized by `recipe` at tensors `names`."""
    identity = f"{base_fingerprint}|{check_recipe(recipe)}|v{_RECIPE_VERSION}|{','.join(sorted(names))}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class QuantizedBase:
    """A base checkpoint seen through a recipe: `mapped(name)` of a quantized tensor is its
    dequantized fp32 value, every other tensor is the checkpoint's; `identity` is what a delta made
    over it records (DeltaConfig.base_quant). Everything else is the checkpoint's own."""

    def __init__(self, checkpoint, recipe: str, names: Iterable[str]):
        self.checkpoint, self.recipe, self.names = checkpoint, check_recipe(recipe), frozenset(names)
        self.identity = {"recipe": recipe, "fingerprint": quantized_fingerprint(checkpoint.fingerprint, recipe, self.names)}

    def mapped(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.mapped(name)
        if name not in self.names:
            return tensor
        # a block of rows at a time (every recipe quantizes a row on its own; stacked experts too): the
        # fp32 temporaries stay a block's, not the matrix's
        rows = tensor.reshape(-1, tensor.shape[-1])
        values = torch.empty(rows.shape, dtype=torch.float32)
        step = max(1, ROW_BLOCK_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            values[start : start + step] = quantize(rows[start : start + step], self.recipe).dequantize()
        return values.reshape(tensor.shape)

    def __getattr__(self, attribute: str):
        return getattr(self.checkpoint, attribute)
