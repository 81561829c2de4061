"""BitDeltaLinear: a base linear plus any number of 1-bit deltas, chosen per row of the batch.

    y = x @ W_base.T + bias + scale[t] * (x @ sign[t].T)

The packed signs are never expanded into a stored dense matrix: the CPU path unpacks them per
call (bitdelta.kernels.reference), the GPU path reads the bits inside a Triton kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from bitdelta import kernels
from bitdelta.kernels import SlotPlan


class DeltaRouting:
    """Which delta slot each sequence (or each row) of the next forward pass uses.

    One object is shared by every BitDeltaLinear of a model, so a caller sets it once per step.
    `slot_ids` of None means every row uses slot 0; -1 means the base model alone.
    `plan` (kernels.build_plan of the row slot ids) lets every layer of a step share one grouping
    of the rows by slot instead of each kernel call building its own; None builds it per call.
    """

    def __init__(self) -> None:
        self.slot_ids: torch.Tensor | None = None
        self.plan: SlotPlan | None = None

    def row_slots(self, rows: int, sequences: int, device: torch.device) -> torch.Tensor:
        if self.slot_ids is None:
            return torch.zeros(rows, dtype=torch.int32, device=device)
        slot_ids = self.slot_ids.to(device=device, dtype=torch.int32)
        if slot_ids.numel() == rows:
            return slot_ids
        if slot_ids.numel() == sequences and rows % sequences == 0:
            return slot_ids.repeat_interleave(rows // sequences)
        raise ValueError(f"{slot_ids.numel()} slot ids fit neither {rows} rows nor {sequences} sequences")


class BitDeltaLinear(nn.Module):
    def __init__(self, base: nn.Linear, signs: torch.Tensor, scales: torch.Tensor, routing: DeltaRouting):
        super().__init__()
        if signs.ndim != 3 or scales.shape != signs.shape[:2]:
            raise ValueError(f"signs must be [S, N, Kw] and scales [S, N]; got {tuple(signs.shape)} and {tuple(scales.shape)}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        self.register_buffer("signs", signs)
        self.register_buffer("scales", scales.float())  # per slot and output row; distillation trains its own copies (DistillLinear)
        self.routing = routing
        # Per-slot biases [S, N] (rows of slot -1 keep `bias`): a fine-tune changes biases too
        # (Qwen2's q/k/v), and a multi-tenant batch needs each row's own. None: `bias` for all.
        self.slot_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        slot_ids = self.routing.row_slots(rows.shape[0], x.shape[0] if x.ndim > 1 else 1, x.device)
        if self.slot_bias is None:
            y = kernels.bitdelta_matmul(rows, self.weight, self.signs, self.scales, slot_ids, self.bias, self.routing.plan)
        else:
            y = kernels.bitdelta_matmul(rows, self.weight, self.signs, self.scales, slot_ids, None, self.routing.plan)
            y = y + self._row_biases(slot_ids).to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _row_biases(self, slot_ids: torch.Tensor) -> torch.Tensor:
        own = self.slot_bias[slot_ids.clamp(min=0).long()]
        if self.bias is None:
            return own.masked_fill(slot_ids[:, None] < 0, 0)
        return torch.where(slot_ids[:, None] >= 0, own, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, deltas={self.signs.shape[0]}"


class StackedBitDeltaLinears(nn.Module):
    """Several BitDeltaLinears reading the same input (q, k and v; gate and up), computed as one:
    their weights, signs and scales stacked along N, one kernel call instead of one a part. A serving
    step pays host time for every launch (an eager step of a 7B model issues thousands), and a wider
    N fills the GPU better at small batches.

    The parts stay the model's modules: their tensors become views of the stacked ones, so whatever
    writes a part's slot (the engine's `install`) writes the stacked tensors. A part's per-slot
    biases (`slot_bias`), when a fine-tune has them, are added per part after the product. The stack
    is built for a model already on its device and in its dtype: a later `.to()` of the model would
    leave it behind (the engine never moves a model after wrapping it)."""

    def __init__(self, parts: list[BitDeltaLinear]):
        super().__init__()
        first = parts[0]
        if any(p.in_features != first.in_features or p.routing is not first.routing or p.signs.shape[0] != first.signs.shape[0]
               or p.weight.dtype != first.weight.dtype for p in parts):
            raise ValueError("stacked linears must share their input size, dtype, routing and slot count")
        self.in_features = first.in_features
        self.routing = first.routing
        self.parts = tuple(parts)  # not submodules: they already sit in the model's tree
        self.widths = [p.out_features for p in parts]
        self.weight = _stack_rows([p.weight.detach() for p in parts])
        self.signs = torch.cat([p.signs for p in parts], dim=1)
        self.scales = torch.cat([p.scales for p in parts], dim=1)
        self.stack_biases()
        start = 0
        for part, width in zip(parts, self.widths):
            rows = slice(start, start + width)
            part.weight = nn.Parameter(self.weight[rows], requires_grad=False)
            part.signs = self.signs[:, rows]
            part.scales = self.scales[:, rows]
            start += width

    def stack_biases(self) -> None:
        """Stack the parts' static biases (again, after they changed dtype)."""
        self._biases = {(): self._static_bias(())}  # per set of parts with per-slot biases: the others' static ones

    def _static_bias(self, slotted: tuple[int, ...]) -> torch.Tensor | None:
        """The stacked static biases, zero for the parts in `slotted` (they add their own per row)."""
        parts = self.parts
        if all(p.bias is None or i in slotted for i, p in enumerate(parts)):
            return None
        return torch.cat([p.bias.detach() if p.bias is not None and i not in slotted else p.weight.new_zeros(p.out_features)
                          for i, p in enumerate(parts)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = x.reshape(-1, self.in_features)
        slot_ids = self.routing.row_slots(rows.shape[0], x.shape[0] if x.ndim > 1 else 1, x.device)
        slotted = tuple(i for i, p in enumerate(self.parts) if p.slot_bias is not None)
        if slotted not in self._biases:
            self._biases[slotted] = self._static_bias(slotted)
        y = kernels.bitdelta_matmul(rows, self.weight, self.signs, self.scales, slot_ids, self._biases[slotted],
                                    self.routing.plan)
        outs = y.split(self.widths, dim=1)
        if slotted:  # as BitDeltaLinear does: the rows' own biases after the product
            outs = tuple(out + self.parts[i]._row_biases(slot_ids).to(out.dtype) if i in slotted else out
                         for i, out in enumerate(outs))
        return tuple(out.reshape(*x.shape[:-1], width) for out, width in zip(outs, self.widths))


def _stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors), or a view without a copy when they already are consecutive row blocks of one
    tensor: a caller keeping references to the parts (a benchmark's weights) would hold them twice."""
    first = tensors[0]
    end = first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != end or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return torch.cat(tensors)
        end += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), (first[0].numel(), *first.stride()[1:]))


def bitdelta_linears(model: nn.Module) -> dict[str, BitDeltaLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BitDeltaLinear)}


def replace_linear(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
