"""Fidelity to the fine-tune on held-out token windows: perplexity, logit MSE, KL, top-1 agreement.

The fine-tune's logits are computed once (`reference`) and kept on the CPU in fp32; every other model
is then scored against them one batch at a time, so only one model is ever in memory. Memory for the
reference: windows * seq_len * vocab * 4 bytes (32 x 256 x 32000 -> 1.0 GB for Llama-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Reference:
    windows: torch.Tensor  # int64 [count, seq_len] held-out token ids
    logits: list[torch.Tensor]  # the fine-tune's fp32 logits, one [batch, seq_len, vocab] tensor per batch
    batch_size: int


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch.to(_device(model))).logits.float()


def reference(finetuned, windows: torch.Tensor, batch_size: int = 8) -> Reference:
    """The fine-tune's logits on `windows`, the target every other model is compared with."""
    finetuned.eval()
    return Reference(windows, [_logits(finetuned, b).cpu() for b in windows.split(batch_size)], batch_size)


@torch.no_grad()
def fidelity(model, ref: Reference) -> dict[str, float]:
    """Held-out next-token loss and perplexity of `model`, and how closely it follows the fine-tune:

    logit_mse  mean over positions and the whole vocabulary of (z_model - z_ft)^2
    kl         KL(p_ft || p_model) in nats per token, full vocabulary
    top1       share of positions where both models rank the same token first
    """
    model.eval()
    device = _device(model)
    sums = dict(nll=0.0, mse=0.0, kl=0.0, top1=0.0)
    predicted = positions = 0
    for batch, target in zip(ref.windows.split(ref.batch_size), ref.logits):
        logits, target = _logits(model, batch), target.to(device)
        ids = batch.to(device)
        sums["nll"] += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        sums["mse"] += (logits - target).pow(2).mean(-1).sum().item()
        logp, logq = target.log_softmax(-1), logits.log_softmax(-1)
        sums["kl"] += (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).sum().item()
        sums["top1"] += (logits.argmax(-1) == target.argmax(-1)).sum().item()
        predicted += ids[:, 1:].numel()
        positions += ids.numel()
    loss = sums["nll"] / predicted
    return dict(loss=loss, ppl=math.exp(loss), logit_mse=sums["mse"] / positions, kl=sums["kl"] / positions, top1=sums["top1"] / positions)


def gain_kept(value: float, base: float, finetuned: float) -> float | None:
    """Share of the fine-tune's improvement over the base that `value` keeps (1 = all, 0 = none).

    Works for losses (lower is better) and accuracies alike: (value - base) / (finetuned - base).
    None when the fine-tune did not move the metric at all.
    """
    if finetuned == base or any(map(math.isnan, (value, base, finetuned))):
        return None
    return (value - base) / (finetuned - base)
