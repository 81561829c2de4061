"""Checkpoint tensor names -> where the tensors live in a transformers model.

Checkpoints (and so deltas, which keep the fine-tune's names) name one matrix per expert
(`...experts.3.w1.weight`, `...experts.3.gate_proj.weight`) while transformers' MoE blocks hold
each layer's experts fused, `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I],
and some families rename modules on load (Mixtral's `block_sparse_moe` is `mlp`). transformers'
own conversion rules for the model type say how; they are read here, so no name list is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FUSED_EXPERTS = ("gate_up_proj", "down_proj")  # the 3-D expert tensors of a transformers MoE block


@dataclass(frozen=True)
class FusedExpertPart:
    """A checkpoint expert matrix inside the model: part `part` of `parts` matrices concatenated
    along the rows of expert `expert` of the fused tensor `fused` (a model parameter name)."""

    fused: str
    expert: int
    part: int
    parts: int

    def rows(self, fused_rows: int) -> slice:
        """Its rows in the expert's [fused_rows, K] matrix."""
        count = fused_rows // self.parts
        return slice(self.part * count, (self.part + 1) * count)


@dataclass(frozen=True)
class _FusingRule:
    source: re.Pattern  # matches `.experts.<index>.<matrix>.weight`, the index captured
    target: str  # the fused tensor's name suffix, e.g. `.experts.gate_up_proj`
    part: int  # which of the concatenated matrices (gate 0, up 1)
    parts: int


class CheckpointNames:
    """The conversion rules of one model type; a type without rules keeps its checkpoint names."""

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
        """The model's name for a tensor the model holds as it is in the checkpoint."""
        for source, target in self.renamings:
            name = re.sub(source, target, name)
        return name

    def fused_expert(self, name: str) -> FusedExpertPart | None:
        """Where checkpoint matrix `name` lives if the model fuses it into a 3-D expert tensor."""
        renamed = self.renamed(name)
        for rule in self.fusing:
            match = rule.source.search(renamed)
            if match is not None:
                return FusedExpertPart(renamed[: match.start()] + rule.target, int(match.group(1)), rule.part, rule.parts)
        return None


def _conversion_rules(model_type: str) -> list:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without conversion rules loads checkpoints under their own names
        return []
    return get_checkpoint_conversion_mapping(model_type) or []
