"""Mixture-of-experts blocks served with each row's own fine-tune's experts and router.

transformers' MoE blocks hold a layer's experts fused (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); deltas name one matrix per expert, placed by
`bitdelta.model_names`. Each MoE layer keeps per-slot expert deltas beside the base experts, laid
out [E, S, N, K/32] so that one expert's deltas of every slot are one contiguous [S, N, K/32]
block, the layout `bitdelta_matmul` reads. A step routes each row with its own fine-tune's router
(softmax, top-k, renormalised as the family does), groups the (row, expert) pairs by expert, and
computes each expert once over its rows: its base matrix is read once, and `bitdelta_matmul`
groups those rows by delta slot, so each distinct delta of the expert is read once too. The
grouping reads the routing on the host, so MoE steps run eagerly (no CUDA graphs).
"""

from __future__ import annotations

import torch
from torch import nn

from bitdelta.kernels import bitdelta_matmul
from bitdelta.model_names import FUSED_EXPERTS
from bitdelta.pack import packed_words
from bitdelta.quant import quantize


def is_moe_block(module: nn.Module) -> bool:
    """A transformers MoE block: fused 3-D experts beside a router with one weight row per expert."""
    experts, router = getattr(module, "experts", None), getattr(module, "gate", None)
    return (experts is not None and all(getattr(experts, name, None) is not None and experts.get_parameter(name).ndim == 3
                                        for name in FUSED_EXPERTS) and isinstance(getattr(router, "weight", None), torch.Tensor))


class ExpertLayer:
    """One MoE block's base experts and router with per-slot 1-bit expert deltas."""

    def __init__(self, block: nn.Module, max_slots: int, normalize_top_k: bool):
        experts = block.experts
        self.weights = {name: experts.get_parameter(name) for name in FUSED_EXPERTS}  # [E, N, K] each, or quantized
        self.shapes = {name: tuple(weight.shape) for name, weight in self.weights.items()}
        self.activation = experts.act_fn
        self.router = block.gate.weight  # [E, H]
        self.top_k = block.gate.top_k
        self.normalize_top_k = normalize_top_k
        device = self.router.device
        self.cuts = None  # with tensor parallelism, how each fused tensor was cut from the full matrices (parallel.expert_cuts)
        self.signs, self.scales = {}, {}
        for name, (count, n, k) in self.shapes.items():
            self.signs[name] = torch.zeros(count, max_slots, n, packed_words(k), dtype=torch.int32, device=device)
            self.scales[name] = torch.zeros(count, max_slots, n, device=device)

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def quantize(self, recipe: str) -> None:
        """Hold the base experts quantized by `recipe`, row by row (bitdelta.quant): [E * N, K] each."""
        for name, (count, n, k) in self.shapes.items():
            self.weights[name] = quantize(self.weights[name].detach().reshape(count * n, k), recipe)

    def _base(self, name: str, expert: int):
        weight = self.weights[name]
        if isinstance(weight, torch.Tensor):
            return weight[expert]
        rows = self.shapes[name][1]
        return weight.rows(slice(expert * rows, (expert + 1) * rows))

    def install(self, slot: int, fused: str, expert: int, rows: slice, signs: torch.Tensor, scales: torch.Tensor) -> None:
        """One expert matrix of a delta (the full matrix's signs and row scales, cut to this rank's
        share under tensor parallelism): rows `rows` of expert `expert` of tensor `fused` in `slot`."""
        if self.cuts is not None:
            signs, scales = self.cuts[fused].signs(signs), self.cuts[fused].rows(scales)
        self.signs[fused][expert, slot, rows].copy_(signs, non_blocking=True)
        self.scales[fused][expert, slot, rows].copy_(scales, non_blocking=True)

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
        counts = torch.bincount(pair_expert, minlength=self.num_experts).tolist()  # host sync (and each expert's slot grouping)
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
        if self.cuts is not None:  # each rank summed its share of the down products
            torch.distributed.all_reduce(out)
        return out.to(x.dtype)

    def _expert(self, expert: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        def product(name: str, inputs: torch.Tensor) -> torch.Tensor:
            return bitdelta_matmul(inputs, self._base(name, expert), self.signs[name][expert], self.scales[name][expert], slots)

        gate, up = product("gate_up_proj", x).chunk(2, dim=-1)
        return product("down_proj", self.activation(gate) * up)
