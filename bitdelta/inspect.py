"""What a delta holds: the data behind `bitdelta info`."""

from __future__ import annotations

from pathlib import Path

from bitdelta.fileformat import DeltaReader
from bitdelta.targets import list_item


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
        base_model=config.base_model, base_fingerprint=config.base_fingerprint, base_quant=config.base_quant, finetuned_model=config.finetuned_model,
        model_type=config.model_type, scale_granularity=config.scale_granularity,
        compressed_count=len(config.compressed), dense_count=len(config.dense), removed_count=len(config.removed),
        delta_bytes=reader.nbytes, finetuned_bytes=config.finetuned_bytes,
        compression_factor=config.finetuned_bytes / reader.nbytes, distillation=config.distillation, tensors=rows,
    )


def fold_lists(rows: list[dict]) -> list[dict]:
    """Summary rows with the items of a numbered list inside a block (a layer's experts) stored the
    same way folded into one row: `...experts.0-127.down_proj.weight`, shape [count, N, K], the
    mean scale and the summed bytes. A stacked [E, N, K] tensor is one row already."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    folded: list[dict | tuple] = []
    for row in rows:
        listed = list_item(row["name"])
        if listed is None:
            folded.append(row)
            continue
        key = (listed[0], listed[2], row["stored_as"], tuple(row["shape"]))
        if key not in groups:
            groups[key] = []
            folded.append(key)
        groups[key].append((listed[1], row))
    return [item if isinstance(item, dict) else _folded(item, groups[item]) for item in folded]


def _folded(key: tuple, items: list[tuple[int, dict]]) -> dict:
    if len(items) == 1:
        return items[0][1]
    indices = sorted(index for index, _ in items)
    span = f"{indices[0]}-{indices[-1]}" if indices == list(range(indices[0], indices[-1] + 1)) else ",".join(map(str, indices))
    scales = [row["scale"] for _, row in items if row["scale"] is not None]
    return dict(name=f"{key[0]}.{span}.{key[1]}", shape=[len(items), *key[3]], stored_as=key[2],
                scale=sum(scales) / len(scales) if scales else None, bytes=sum(row["bytes"] for _, row in items))
