"""Is FINETUNED a fine-tune of BASE? Two cheap checks before compress writes anything.

A wrong base of the same architecture compresses without an error, but its delta is as large as the
weights themselves and one bit per weight keeps nothing of the fine-tune (issue 19 measured -16.5%
of the gain: worse than the base). A fine-tune stays close to its base: the cosine similarity of their
block linears is near 1, while two independently trained models have near-orthogonal weights
(hidden units are permuted arbitrarily by training), cosine near 0.

Measured over the first 8 compressed matrices (see MIN_COSINE): every fine-tune in the tests and
the demo 0.96-0.99; the tiny llama base (trained 40 steps) fine-tuned 100-400 steps 0.80-0.81, and
0.54 for 400 steps at lr 3e-3 (a delta 1.5x the base's weights); a base of the same shape trained
from another seed, or left at its random init, between -0.001 and 0.006. The relative change
||W_ft - W_base|| / ||W_base|| separates less well: 0.13-0.30 for those fine-tunes, but 0.72-1.53
for the hard ones against 1.40-1.65 for unrelated bases, since a long fine-tune grows the weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from bitdelta.checkpoint import Checkpoint
from bitdelta.errors import UnrelatedModelsError

# Fine-tunes measured at 0.54 and up, unrelated models within +-0.01 (a cosine of n random values
# spreads as 1/sqrt(n): 0.004 for the tiny test models, far less for real ones): 0.2 leaves a wide
# margin on both sides.
MIN_COSINE = 0.2
# The first block's linears, and one more: enough evidence at once, read before anything is written.
CHECKED_MATRICES = 8
_CHUNK_ELEMENTS = 1 << 22


def check_finetune_of(base: Checkpoint, finetuned: Checkpoint, targets: Sequence[str]) -> None:
    """Refuse a pair whose fine-tune does not look like a fine-tune of the base: base and fine-tune
    swapped (the fine-tune has a smaller vocabulary), or weights unrelated to the base's."""
    _check_not_swapped(base, finetuned)
    checked = list(targets[:CHECKED_MATRICES])
    cosine = weight_cosine(base, finetuned, checked)
    if cosine < MIN_COSINE:
        raise UnrelatedModelsError(
            f"{finetuned.name} is not a fine-tune of {base.name}: their weights are unrelated (cosine similarity {cosine:.2f} "
            f"over {len(checked)} block matrices, where a fine-tune keeps above {MIN_COSINE}, so a 1-bit delta would lose it); "
            "pass the base it was fine-tuned from, or --allow-unrelated-base to compress anyway"
        )


def weight_cosine(base: Checkpoint, finetuned: Checkpoint, names: Sequence[str]) -> float:
    """Cosine similarity of the fine-tune's and the base's tensors `names`, taken together as one
    vector; 1.0 when there is nothing to compare (no names, or all-zero tensors)."""
    dot = base_norm = finetuned_norm = 0.0
    for name in names:
        for base_rows, finetuned_rows in _row_blocks(base.mapped(name), finetuned.mapped(name)):
            dot += torch.sum(base_rows * finetuned_rows, dtype=torch.float64).item()
            base_norm += torch.sum(base_rows * base_rows, dtype=torch.float64).item()
            finetuned_norm += torch.sum(finetuned_rows * finetuned_rows, dtype=torch.float64).item()
    if base_norm == 0 or finetuned_norm == 0:
        return 1.0
    return dot / (base_norm * finetuned_norm) ** 0.5


def _row_blocks(base: torch.Tensor, finetuned: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """fp32 blocks of rows of both matrices (of every matrix of a stacked tensor): 16 MB at a time,
    whatever the matrix's size."""
    base, finetuned = base.flatten(0, -2), finetuned.flatten(0, -2)
    step = max(1, _CHUNK_ELEMENTS // max(base.shape[-1], 1))
    for start in range(0, base.shape[0], step):
        yield base[start : start + step].float(), finetuned[start : start + step].float()


def _check_not_swapped(base: Checkpoint, finetuned: Checkpoint) -> None:
    """Fine-tunes add tokens (chat roles, tools) and never drop them: a fine-tune with fewer tokens
    than its base is almost surely the base, given second."""
    base_vocab, finetuned_vocab = _vocabulary(base.config), _vocabulary(finetuned.config)
    if base_vocab and finetuned_vocab and finetuned_vocab < base_vocab:
        raise UnrelatedModelsError(
            f"the fine-tune {finetuned.name} has fewer tokens ({finetuned_vocab:,}) than the base {base.name} ({base_vocab:,}): "
            "BASE and FINETUNED look swapped (the base comes first); pass --allow-unrelated-base if this fine-tune really dropped tokens"
        )


def _vocabulary(config: dict) -> int | None:
    """The vocabulary size a config declares (multimodal configs keep it in their text config)."""
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
