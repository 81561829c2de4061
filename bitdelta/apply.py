"""Put a delta back on its base: as a standard checkpoint on disk (merge) or as a model in memory (load)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Literal

import torch

from bitdelta.checkpoint import Checkpoint
from bitdelta.delta import BinaryDelta
from bitdelta.device import DTYPES
from bitdelta.errors import BitDeltaError, IncompatibleModelsError
from bitdelta.fileformat import DeltaReader
from bitdelta.nn import BitDeltaLinear, DeltaRouting, replace_linear
from bitdelta.progress import tensor_progress
from bitdelta.quant import ROW_BLOCK_ELEMENTS, QuantizedBase
from bitdelta.storage import ShardWriter, atomic_directory, refuse_existing
from bitdelta.targets import default_targets

DEFAULT_MERGE_SHARD_BYTES = 2 * 1024**3


def parse_dtype(dtype: str, reader: DeltaReader) -> torch.dtype:
    """'auto' is the fine-tune's own dtype."""
    name = reader.config.finetuned_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise BitDeltaError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def open_pair(base: str | Path, delta: str | Path) -> tuple[Checkpoint, DeltaReader]:
    """Open a delta and its base (quantized as the delta was made over it), refusing a base other
    than the one the delta was made from."""
    reader = DeltaReader(delta)
    base_ckpt = quantized_view(Checkpoint(base), reader.config.base_recipe)
    reader.check_base(base_ckpt.fingerprint, str(base), getattr(base_ckpt, "identity", None))
    return base_ckpt, reader


def quantized_view(base: Checkpoint, base_quant: str | None) -> Checkpoint | QuantizedBase:
    """The base as recipe `base_quant` quantizes it (its block matrices), or as it is for None."""
    return base if base_quant is None else QuantizedBase(base, base_quant, default_targets(base))


def quantized_base_model(base: str | Path, base_quant: str, dtype: torch.dtype):
    """The base as a transformers model with its block matrices quantized by `base_quant`: what a
    delta made with `compress --base-quant` is applied to."""
    view = quantized_view(Checkpoint(base), base_quant)
    return _model_from_tensors(view.path, {name: view.mapped(name).to(dtype) for name in view.tensors}, dtype)


def merged_tensors(
    base: Checkpoint, reader: DeltaReader, dtype: torch.dtype | None, unapplied: Collection[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the fine-tune as the delta reconstructs it, one at a time, in its order.

    `dtype` None keeps each tensor's own fine-tune dtype (bit-exact outside the compressed linears).
    For the compressed tensors named in `unapplied`, the base weight is yielded instead.
    """
    config = reader.config
    for name, own_dtype in config.dtypes.items():
        target = getattr(torch, own_dtype)
        if dtype is not None and target.is_floating_point:
            target = dtype
        if name in config.compressed and name not in unapplied:
            yield name, applied_delta(reader.binary_delta(name), base.mapped(name), target)
        elif name in config.dense:
            yield name, reader.dense(name).to(target)
        elif name in base.tensors:  # identical in base and fine-tune, or a compressed linear's base
            yield name, base.mapped(name).to(target)
        else:
            raise IncompatibleModelsError(f"{name} is neither in the delta nor in the base; pass the base the delta was made from")


def applied_delta(delta: BinaryDelta, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """delta.apply(base, dtype), computed a block of rows at a time into the output: the whole-matrix
    fp32 temporaries (base, unpacked signs, their sum) of a 28672 x 8192 matrix would take 2.8 GB.
    A stacked delta [E, N, K] is merged one matrix at a time."""
    if len(delta.shape) > 2:
        merged = torch.empty(delta.shape, dtype=dtype)
        for index, matrix in enumerate(delta.matrices()):
            merged[index] = applied_delta(matrix, base[index], dtype)
        return merged
    n, k = delta.shape
    merged = torch.empty(n, k, dtype=dtype)
    step = max(1, ROW_BLOCK_ELEMENTS // k)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        scale = delta.scale if delta.scale.numel() == 1 else delta.scale[rows]
        block = BinaryDelta(delta.signs[rows], scale, (rows.stop - start, k))
        merged[rows] = block.apply(base[rows], dtype)
    return merged


def merge(
    base: str | Path,
    delta: str | Path,
    output: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MERGE_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write base + delta as a complete Hugging Face checkpoint (sharded safetensors, config,
    tokenizer, chat template) that `AutoModelForCausalLM.from_pretrained` loads as it is."""
    refuse_existing(Path(output), overwrite)
    base_ckpt, reader = open_pair(base, delta)
    target = None if dtype == "auto" else parse_dtype(dtype, reader)
    with atomic_directory(Path(output), overwrite) as tmp:
        writer = ShardWriter(tmp, "model", max_shard_bytes)
        dtypes = reader.config.dtypes
        with tensor_progress("merging", len(dtypes), reader.config.finetuned_bytes, progress) as advance:
            for name, tensor in merged_tensors(base_ckpt, reader, target):
                writer.add(name, tensor)
                advance(tensor.numel() * getattr(torch, dtypes[name]).itemsize)  # in fine-tune bytes, whatever --dtype
                del tensor  # written: free it before the next one is built
        writer.finish()
        for path in reader.small_files():
            shutil.copy2(path, tmp / path.name)
        if target is not None:
            _record_dtype(tmp / "config.json", dtype)
    return Path(output)


def _record_dtype(config_file: Path, dtype: str) -> None:
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    config.update(dict.fromkeys(keys, dtype))
    config_file.write_text(json.dumps(config, indent=2))


def load(
    base: str | Path,
    delta: str | Path,
    *,
    mode: Literal["merged", "bitdelta"] = "merged",
    dtype: str = "auto",
    device: str | torch.device = "cpu",
):
    """A `transformers` causal LM of the fine-tune, rebuilt from base + delta.

    mode="merged": dense weights W_base + scale * sign (what `merge` writes).
    mode="bitdelta": every compressed nn.Linear becomes a BitDeltaLinear that computes
    x @ W_base.T + scale * (x @ sign.T) from the packed bits; the model's `bitdelta_routing`
    attribute selects the slot per row (one delta here, slot 0). Compressed tensors that are no
    nn.Linear weight of the model (mixture-of-experts experts, held in fused modules) are merged.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    if mode not in ("merged", "bitdelta"):
        raise BitDeltaError(f"unknown load mode {mode!r}; use merged or bitdelta")
    base_ckpt, reader = open_pair(base, delta)
    torch_dtype = parse_dtype(dtype, reader)
    config = AutoConfig.from_pretrained(reader.path)
    as_modules = _linear_weights(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config) & reader.config.compressed.keys() if mode == "bitdelta" else set()
    model = _model_from_tensors(reader.path, dict(merged_tensors(base_ckpt, reader, torch_dtype, unapplied=as_modules)), torch_dtype)
    model.bitdelta_routing = DeltaRouting()
    _attach_deltas(model, reader, as_modules)
    return model.to(device).eval()


def _model_from_tensors(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """The causal LM of `folder`'s config over `state`, tensors under their checkpoint names: the
    loader applies the same renames and expert fusing as for files on disk."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def _linear_weights(model_class, config) -> set[str]:
    """Names of the model's nn.Linear weights (built on the meta device: no memory)."""
    with torch.device("meta"):
        skeleton = model_class(config)
    return {f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)}


def _attach_deltas(model, reader: DeltaReader, names: Collection[str]) -> None:
    """Swap the linears `names` for BitDeltaLinears holding this one delta in slot 0."""
    for name in names:
        module_name = name.removesuffix(".weight")
        linear = model.get_submodule(module_name)
        delta = reader.binary_delta(name)
        replace_linear(model, module_name, BitDeltaLinear(linear, delta.signs.unsqueeze(0), delta.row_scales().unsqueeze(0), model.bitdelta_routing))
