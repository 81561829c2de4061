"""What a delta holds: the data behind `bitdelta info`."""

from __future__ import annotations

from pathlib import Path

from bitdelta.fileformat import DeltaReader


def summarize(delta: str | Path) -> dict:
    """Tensors (how each is stored, its scale, its bytes), totals and the compression factor."""
    reader = DeltaReader(delta)
    config = reader.config
    rows = []
    for name, shape in config.compressed.items():
        binary = reader.binary_delta(name)
        nbytes = binary.signs.numel() * 4 + binary.scale.numel() * 4
        rows.append(dict(name=name, shape=shape, stored_as=f"1-bit, {config.scale_granularity} scale", scale=binary.scale.mean().item(), bytes=nbytes))
    for name, shape in config.dense.items():
        tensor = reader.dense(name)
        rows.append(dict(name=name, shape=shape, stored_as=f"lossless {config.dtypes[name]}", scale=None, bytes=tensor.numel() * tensor.element_size()))
    return dict(
        base_model=config.base_model, base_fingerprint=config.base_fingerprint, finetuned_model=config.finetuned_model,
        model_type=config.model_type, scale_granularity=config.scale_granularity,
        compressed_count=len(config.compressed), dense_count=len(config.dense), removed_count=len(config.removed),
        delta_bytes=reader.nbytes, finetuned_bytes=config.finetuned_bytes,
        compression_factor=config.finetuned_bytes / reader.nbytes, distillation=config.distillation, tensors=rows,
    )
