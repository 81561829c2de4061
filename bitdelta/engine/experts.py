"""Mixture-of-experts blocks served with each row's own fine-tune's experts and router.

transformers' MoE blocks hold a layer's experts fused (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); deltas name one matrix per expert, placed by
`bitdelta.model_names`. Each MoE layer keeps per-slot expert deltas beside the base experts, laid
out [E, S, N, K/32] so that one expert's deltas of every slot are one contiguous [S, N, K/32]
block, the layout `bitdelta_matmul` reads. A step routes each row with its own fine-tune's router
(softmax, top-k, renormalised as the family does) and computes every (row, expert) pair with
`kernels.experts.expert_matmul`: on a GPU one launch for the gate/up products and one for the down
products, the pairs grouped by expert and delta slot on the device, so each routed expert's base
matrix and each distinct delta of it are read once and nothing waits on the host (the step can be
a CUDA graph); the CPU takes a per-expert loop.
"""

from __future__ import annotations

import torch
from torch import nn

from bitdelta.kernels.experts import ExpertPairs, expert_matmul, grouped
from bitdelta.model_names import FUSED_EXPERTS
from bitdelta.pack import packed_words

from .parallel import quantize_share


def is_moe_block(module: nn.Module) -> bool:
    """A transformers MoE block: fused 3-D experts beside a router with one weight row per expert."""
    experts, router = getattr(module, "experts", None), getattr(module, "gate", None)
    return (experts is not None and all(getattr(experts, name, None) is not None and experts.get_parameter(name).ndim == 3
                                        for name in FUSED_EXPERTS) and isinstance(getattr(router, "weight", None), torch.Tensor))


class ExpertLayer:
    """One MoE block's base experts and router with per-slot 1-bit expert deltas."""

    def __init__(self, block: nn.Module, max_slots: int, normalize_top_k: bool):
        experts = self.module = block.experts
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

    def graphable(self, device: torch.device) -> bool:
        """Whether this block's step can be a CUDA graph: its experts in one launch each, no collective."""
        probe = torch.empty(0, 1, dtype=self.router.dtype, device=device)
        return self.cuts is None and all(grouped(probe, weight) for weight in self.weights.values())

    def quantize(self, recipe: str) -> None:
        """Hold the base experts quantized by `recipe`, row by row (bitdelta.quant): [E * N, K] each, a
        share of the inputs (tensor parallel) as inside the whole matrices."""
        for name, (count, n, k) in self.shapes.items():
            shard = None if self.cuts is None else self.cuts[name]
            self.weights[name] = quantize_share(self.weights[name].detach().reshape(count * n, k), recipe, shard)
            delattr(self.module, name)  # the full-precision experts go: the engine computes from `weights`

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
        given each row's router logits [T, E] (computed with its own fine-tune's router). Pair
        p = t * top_k + j is row t's j-th expert."""
        probabilities = torch.softmax(router_logits.float(), dim=-1)
        weights, chosen = torch.topk(probabilities, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        pairs = ExpertPairs(chosen.flatten(), slots.repeat_interleave(self.top_k), self.num_experts,
                            self.signs["down_proj"].shape[1])
        inputs = x.repeat_interleave(self.top_k, dim=0)
        gate, up = self._product("gate_up_proj", inputs, pairs).chunk(2, dim=-1)
        y = self._product("down_proj", self.activation(gate) * up, pairs)
        out = (y.view(x.shape[0], self.top_k, -1).float() * weights[..., None]).sum(dim=1)
        if self.cuts is not None:  # each rank summed its share of the down products
            torch.distributed.all_reduce(out)
        return out.to(x.dtype)

    def _product(self, name: str, inputs: torch.Tensor, pairs: ExpertPairs) -> torch.Tensor:
        return expert_matmul(inputs, self.weights[name], self.signs[name], self.scales[name], pairs)
