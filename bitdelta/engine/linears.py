"""The decoder blocks' linears as the engine holds them: each nn.Linear swapped for a
BitDeltaLinear with delta slots, a layer's q/k/v and gate/up stacked into one product, the base
weights optionally quantized (bitdelta.quant) and, with tensor parallelism, cut to this rank's share."""

from __future__ import annotations

import torch
from torch import nn

from bitdelta.nn import BitDeltaLinear, DeltaRouting, StackedBitDeltaLinears, replace_linear
from bitdelta.pack import packed_words
from bitdelta.quant import quantize

from .parallel import AllReduced, quantize_share

# the linears of a layer computed as one product (they read the same input): q/k/v, then gate/up
STACKED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
FUSED = {"self_attn": "qkv_proj", "mlp": "gate_up_proj"}  # Phi-3 keeps each of those stacks as one linear


def swap_layer_linears(model: nn.Module, index: int, max_slots: int, routing: DeltaRouting, moe: bool
                       ) -> tuple[dict[str, BitDeltaLinear], StackedBitDeltaLinears, StackedBitDeltaLinears | None]:
    """Every nn.Linear inside decoder block `index` (the tensors `compress` makes 1-bit) becomes a
    BitDeltaLinear with `max_slots` empty slots, keyed by checkpoint weight name. A linear already
    cut to this rank's share (parallel.load_share) keeps its cut; a row-parallel one is wrapped
    in an all-reduce in the model's tree. The block's q/k/v and gate/up are then stacked (None for
    an MoE block's experts). Returns (linears, q/k/v stack, gate/up stack)."""
    layer = model.model.layers[index]
    linears = {}
    for name, module in list(layer.named_modules(prefix=f"model.layers.{index}")):
        if isinstance(module, nn.Linear):
            n, k = module.weight.shape
            signs = torch.zeros(max_slots, n, packed_words(k), dtype=torch.int32, device=module.weight.device)
            scales = torch.zeros(max_slots, n, device=module.weight.device)
            linears[name + ".weight"] = new = BitDeltaLinear(module, signs, scales, routing)
            new.shard = getattr(module, "shard", None)
            replace_linear(model, name, AllReduced(new) if new.shard is not None and new.shard.dim == 1 else new)
    attention, mlp = (None if block == "mlp" and moe else _stacked(layer.get_submodule(block), parts, FUSED[block])
                      for block, parts in STACKED)
    return linears, attention, mlp


def quantize_linears(linears: dict[str, BitDeltaLinear], stacks: list[StackedBitDeltaLinears | None], recipe: str) -> None:
    """Hold every block linear's base weight quantized by `recipe`, a stack's rows at once (each
    recipe quantizes rows on their own, so a part's rows are its own)."""
    stacked = set()
    for stack in filter(None, stacks):
        stack.weight = quantize(stack.weight, recipe)
        start = 0
        for part, width in zip(stack.parts, stack.widths):
            _set_weight(part, stack.weight.rows(slice(start, start + width)))
            stacked.add(id(part))
            start += width
    for linear in linears.values():
        if id(linear) not in stacked:  # under tensor parallelism o_proj and down_proj hold a share of their inputs
            _set_weight(linear, quantize_share(linear.weight, recipe, getattr(linear, "shard", None)))


def full_shape(linear: nn.Module) -> tuple[int, int]:
    """A linear's [N, K]: of the whole matrix, also when this rank holds a share of it."""
    shard = getattr(linear, "shard", None)
    return tuple(linear.weight.shape) if shard is None else shard.full_shape


def _set_weight(linear: nn.Module, weight) -> None:
    del linear.weight  # a parameter: the quantized weight is a plain attribute
    linear.weight = weight


def _stacked(module: nn.Module, parts: tuple[str, ...], fused: str) -> StackedBitDeltaLinears:
    """A block's linears that read one input as one product: its separate parts, or its one fused linear."""
    return StackedBitDeltaLinears([getattr(module, name) for name in (parts if hasattr(module, parts[0]) else (fused,))])
