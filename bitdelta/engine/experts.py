"""Mixture-of-experts layers served with each row's own fine-tune's experts and router.

A transformers MoE block holds its experts fused, `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I], while checkpoints (and so deltas) name one matrix per expert
(`...experts.3.w1.weight`, `...experts.3.gate_proj.weight`). `CheckpointNames` maps a checkpoint
name to where it lives in the model, with transformers' own conversion rules for the model type,
so no name list is kept here.

Each MoE layer keeps per-slot expert deltas beside the base experts, laid out [E, S, N, K/32] so
that one expert's deltas of every slot are one contiguous [S, N, K/32] block, the layout
`bitdelta_matmul` reads. A step routes each row with its own fine-tune's router (softmax, top-k,
renormalised as the family does), groups the (row, expert) pairs by expert, and computes each
expert once over its rows: its base matrix is read once, and `bitdelta_matmul` groups those rows by
delta slot, so each distinct delta of the expert is read once too. The grouping reads the routing
on the host, so MoE steps run eagerly (no CUDA graphs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from bitdelta.kernels import bitdelta_matmul
from bitdelta.pack import packed_words

FUSED_EXPERTS = ("gate_up_proj", "down_proj")  # the 3-D expert tensors of a transformers MoE block


@dataclass(frozen=True)
class ExpertRows:
    """One checkpoint expert matrix inside a layer's fused expert tensor: rows [start, start + count)
    of expert `expert` of `layer`'s `fused` tensor."""

    layer: int
    fused: str
    expert: int
    start: int
    count: int


@dataclass(frozen=True)
class _FusingRule:
    source: re.Pattern  # matches `.experts.<index>.<matrix>.weight`, the index captured
    target: str  # the fused tensor's name suffix, e.g. `.experts.gate_up_proj`
    part: int  # which of the concatenated matrices (gate 0, up 1)
    parts: int


class CheckpointNames:
    """Checkpoint tensor names -> the model's, by transformers' conversion rules for `model_type`
    (renamings such as Mixtral's `block_sparse_moe` -> `mlp`, and per-expert matrices fused into
    3-D tensors). A model type without rules keeps its checkpoint names."""

    def __init__(self, model_type: str):
        self.renamings: list[tuple[str, str]] = []
        self.fusing: list[_FusingRule] = []
        for rule in _conversion_rules(model_type):
            sources, targets = list(rule.source_patterns), list(rule.target_patterns)
            if type(rule).__name__ == "WeightRenaming":
                self.renamings.append((sources[0], targets[0]))
            elif len(targets) == 1 and targets[0].split(".")[-1] in FUSED_EXPERTS:
                for part, source in enumerate(sources):
                    pattern = re.compile(re.escape(source).replace(r"\*", r"(\d+)") + "$")
                    self.fusing.append(_FusingRule(pattern, targets[0], part, len(sources)))

    def renamed(self, name: str) -> str:
        for source, target in self.renamings:
            name = re.sub(source, target, name)
        return name

    def expert(self, name: str, layers: dict[str, int], fused_rows: dict[tuple[int, str], int]) -> ExpertRows | None:
        """Where checkpoint matrix `name` lives, if it is one expert's matrix of an MoE layer:
        `layers` maps each MoE layer's expert-module name (`model.layers.3.mlp.experts`) to its
        layer index, `fused_rows` gives each fused tensor's rows per expert."""
        renamed = self.renamed(name)
        for rule in self.fusing:
            match = rule.source.search(renamed)
            if match is None:
                continue
            fused_name = renamed[: match.start()] + rule.target
            module, _, fused = fused_name.rpartition(".")
            layer = layers.get(module)
            if layer is None:
                return None
            rows = fused_rows[layer, fused] // rule.parts
            return ExpertRows(layer, fused, int(match.group(1)), rule.part * rows, rows)
        return None


def _conversion_rules(model_type: str) -> list:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without conversion rules loads checkpoints under their own names
        return []
    return get_checkpoint_conversion_mapping(model_type) or []


def is_moe_block(module: nn.Module) -> bool:
    """A transformers MoE block: fused 3-D experts beside a router with one weight row per expert."""
    experts, router = getattr(module, "experts", None), getattr(module, "gate", None)
    return (experts is not None and all(getattr(experts, name, None) is not None and experts.get_parameter(name).ndim == 3
                                        for name in FUSED_EXPERTS) and isinstance(getattr(router, "weight", None), torch.Tensor))


class ExpertLayer:
    """One MoE block's base experts and router with per-slot 1-bit expert deltas."""

    def __init__(self, block: nn.Module, max_slots: int, normalize_top_k: bool):
        experts = block.experts
        self.weights = {name: experts.get_parameter(name) for name in FUSED_EXPERTS}  # [E, N, K] each
        self.activation = experts.act_fn
        self.router = block.gate.weight  # [E, H]
        self.top_k = block.gate.top_k
        self.normalize_top_k = normalize_top_k
        device = self.router.device
        self.signs, self.scales = {}, {}
        for name, weight in self.weights.items():
            count, n, k = weight.shape
            self.signs[name] = torch.zeros(count, max_slots, n, packed_words(k), dtype=torch.int32, device=device)
            self.scales[name] = torch.zeros(count, max_slots, n, device=device)

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def install(self, slot: int, rows: ExpertRows, signs: torch.Tensor, scales: torch.Tensor) -> None:
        span = slice(rows.start, rows.start + rows.count)
        self.signs[rows.fused][rows.expert, slot, span].copy_(signs, non_blocking=True)
        self.scales[rows.fused][rows.expert, slot, span].copy_(scales, non_blocking=True)

    def clear(self, slot: int) -> None:
        """A zero delta in `slot` for every expert (what a fine-tune that left the experts unchanged has)."""
        for scales in self.scales.values():
            scales[:, slot].zero_()

    def forward(self, x: torch.Tensor, slots: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The block's output [T, H] for rows `x` [T, H] of fine-tunes `slots` [T] (-1 = base),
        given each row's router logits [T, E] (computed with its own fine-tune's router)."""
        probabilities = torch.softmax(router_logits.float(), dim=-1)
        weights, chosen = torch.topk(probabilities, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        pair_expert = chosen.flatten()
        pair_row = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        order = torch.sort(pair_expert, stable=True).indices
        counts = torch.bincount(pair_expert, minlength=self.num_experts).tolist()  # the one host sync of the block
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start : start + count]
            start += count
            rows = pair_row[pairs]
            y = self._expert(expert, x.index_select(0, rows), slots.index_select(0, rows))
            out.index_add_(0, rows, y.float() * weights.flatten()[pairs, None])
        return out.to(x.dtype)

    def _expert(self, expert: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        def product(name: str, inputs: torch.Tensor) -> torch.Tensor:
            return bitdelta_matmul(inputs, self.weights[name][expert], self.signs[name][expert], self.scales[name][expert], slots)

        gate, up = product("gate_up_proj", x).chunk(2, dim=-1)
        return product("down_proj", self.activation(gate) * up)
