"""base + fine-tune -> delta directory, streaming one tensor pair at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from bitdelta.apply import quantized_view
from bitdelta.checkpoint import Checkpoint
from bitdelta.delta import GRANULARITIES, BinaryDelta, Granularity
from bitdelta.errors import BitDeltaError
from bitdelta.fileformat import DEFAULT_SHARD_BYTES, DeltaConfig, write_delta
from bitdelta.distill import DistillConfig
from bitdelta.distill import distill as run_distillation
from bitdelta.lineage import check_finetune_of
from bitdelta.progress import tensor_progress
from bitdelta.quant import check_recipe
from bitdelta.storage import atomic_directory, refuse_existing
from bitdelta.targets import select_targets


def compress(
    base: str | Path,
    finetuned: str | Path,
    output: str | Path,
    *,
    scale: Granularity = "matrix",
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    distill: DistillConfig | None = None,
    allow_unrelated_base: bool = False,
    base_quant: str | None = None,
) -> Path:
    """Compress `finetuned` against `base` into a delta directory at `output`; return its path.

    Linear weights inside the transformer blocks become packed signs + mean|delta| scale(s);
    every other tensor that differs from the base is stored losslessly. Memory stays bounded by
    one tensor pair (output goes to disk as it is made), so models larger than RAM compress. With `distill`,
    the scales are then calibrated (bitdelta.distill) before `output` appears.

    Before anything is read, an existing `output` is refused (unless `overwrite`); before anything
    is written, a `finetuned` that does not look like a fine-tune of `base` (bitdelta.lineage: a wrong
    or swapped base) is refused unless `allow_unrelated_base`.

    With `base_quant` (a bitdelta.quant recipe) the delta is taken against the base's block linears
    quantized by it, and records the recipe: it is then applied, distilled and served over that
    quantized base only.
    """
    refuse_existing(Path(output), overwrite)
    if base_quant is not None:
        check_recipe(base_quant)
    options = dict(scale=scale, include=include, exclude=exclude, max_shard_bytes=max_shard_bytes, progress=progress,
                   allow_unrelated_base=allow_unrelated_base, base_quant=base_quant)
    if distill is None:
        return _compress(base, finetuned, Path(output), overwrite=overwrite, **options)
    with atomic_directory(Path(output), overwrite) as staging:
        initial = _compress(base, finetuned, staging / "initial", **options)
        run_distillation(base, finetuned, initial, distill, progress)
        for item in initial.iterdir():
            item.rename(staging / item.name)
        initial.rmdir()
    return Path(output)


def _compress(base, finetuned, output: Path, *, scale, include, exclude, max_shard_bytes, progress, allow_unrelated_base, base_quant,
              overwrite=False) -> Path:
    if scale not in GRANULARITIES:
        raise BitDeltaError(f"unknown scale granularity {scale!r}; use one of {', '.join(GRANULARITIES)}")
    base_ckpt, ft_ckpt = Checkpoint(base), Checkpoint(finetuned)
    chosen = select_targets(ft_ckpt, base_ckpt, include, exclude)
    if not allow_unrelated_base:
        check_finetune_of(base_ckpt, ft_ckpt, chosen)
    targets = set(chosen)
    base_ckpt = quantized_view(base_ckpt, base_quant)  # what the delta is taken against
    dense: dict[str, list[int]] = {}

    def stored_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with tensor_progress("compressing", len(ft_ckpt.tensors), ft_ckpt.nbytes, progress) as advance:
            for name, tensor in ft_ckpt.iter_tensors():
                if name in targets:
                    delta = BinaryDelta.from_weights(base_ckpt.mapped(name), tensor, scale)
                    yield name + ".sign", delta.signs
                    yield name + ".scale", delta.scale
                elif not _same_as_base(name, tensor, base_ckpt):
                    dense[name] = list(tensor.shape)
                    yield name, tensor
                advance(tensor.numel() * tensor.element_size())
                del tensor  # before the next one is read: memory holds one pair, not a pair and the last tensor

    def make_config(files: dict[str, str]) -> DeltaConfig:
        return DeltaConfig(
            base_model=str(base),
            base_fingerprint=base_ckpt.fingerprint,
            finetuned_model=str(finetuned),
            finetuned_fingerprint=ft_ckpt.fingerprint,
            model_type=ft_ckpt.config.get("model_type", "unknown"),
            finetuned_dtype=_dominant_dtype(ft_ckpt),
            finetuned_bytes=ft_ckpt.nbytes,
            scale_granularity=scale,
            compressed={n: list(ft_ckpt.tensors[n].shape) for n in ft_ckpt.tensors if n in targets},
            dense=dense,
            removed=sorted(base_ckpt.tensors.keys() - ft_ckpt.tensors.keys()),
            dtypes={n: _dtype_name(m.dtype) for n, m in ft_ckpt.tensors.items()},
            files=files,
            base_quant=getattr(base_ckpt, "identity", None),
        )

    return write_delta(output, stored_tensors(), make_config, ft_ckpt.small_files(), overwrite, max_shard_bytes)


def _same_as_base(name: str, tensor: torch.Tensor, base: Checkpoint) -> bool:
    """True when merging can rebuild the tensor exactly from the base (cast to the fine-tune's dtype)."""
    meta = base.tensors.get(name)
    if meta is None or meta.shape != tuple(tensor.shape):
        return False
    return torch.equal(base.mapped(name).to(tensor.dtype), tensor)


def _dominant_dtype(checkpoint: Checkpoint) -> str:
    totals: dict[torch.dtype, int] = {}
    for meta in checkpoint.tensors.values():
        totals[meta.dtype] = totals.get(meta.dtype, 0) + meta.nbytes
    return _dtype_name(max(totals, key=totals.get))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
