"""The delta directory on disk (docs/format.md documents it for other implementations).

    bitdelta_config.json   DeltaConfig as JSON: what was compressed, from which base, checksums
    delta.safetensors      "<name>.sign" int32 packed signs and "<name>.scale" fp32 scales for each
                           compressed matrix; "<name>" for each tensor kept losslessly
                           (sharded as delta-0000i-of-0000n.safetensors + index when large)
    config.json, tokenizer files, chat template, ...   the fine-tune's own small files

No pickle anywhere. A directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from bitdelta.checkpoint import model_folder_files
from bitdelta.delta import BinaryDelta
from bitdelta.errors import DeltaFormatError, IncompatibleModelsError
from bitdelta.storage import ShardWriter, atomic_directory

FORMAT_VERSION = 1
CONFIG_FILE = "bitdelta_config.json"
WEIGHTS_STEM = "delta"
BIT_LAYOUT = "int32 words along K, bit j of word w = column 32w+j, 1 means +1"
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class DeltaConfig:
    base_model: str
    base_fingerprint: str
    finetuned_model: str
    finetuned_fingerprint: str
    model_type: str
    finetuned_dtype: str  # the dtype most of the fine-tune's bytes are in: what `merge --dtype auto` writes
    finetuned_bytes: int  # size of the fine-tune's weights, for the compression factor
    scale_granularity: str
    compressed: dict[str, list[int]]  # name -> [N, K]
    dense: dict[str, list[int]]  # tensors kept losslessly (they differ from the base)
    removed: list[str]  # base tensors the fine-tune does not have
    dtypes: dict[str, str]  # every fine-tune tensor's dtype, in checkpoint order
    files: dict[str, str] = field(default_factory=dict)  # weight file -> sha256
    distillation: dict | None = None
    # made over the base quantized (bitdelta.quant): {"recipe": ..., "fingerprint": the quantized base's}
    base_quant: dict | None = None

    @property
    def base_recipe(self) -> str | None:
        return None if self.base_quant is None else self.base_quant["recipe"]
    format_version: int = FORMAT_VERSION
    bit_layout: str = BIT_LAYOUT


def write_delta(
    output: Path,
    tensors,
    make_config,
    small_files: list[Path],
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a delta directory atomically.

    `tensors` yields (name, tensor) pairs to store; `make_config(files)` is called after they are
    all written, with the checksums, and returns the DeltaConfig to save.
    """
    with atomic_directory(output, overwrite) as tmp:
        writer = ShardWriter(tmp, WEIGHTS_STEM, max_shard_bytes)
        for name, tensor in tensors:
            writer.add(name, tensor)
        files = {name: _sha256(tmp / name) for name in writer.finish() if name.endswith(".safetensors")}
        for path in small_files:
            shutil.copy2(path, tmp / path.name)
        config = make_config(files)
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return Path(output)


def save_config(delta_dir: Path, config: DeltaConfig) -> None:
    """Replace the config of an existing delta atomically (used to record distillation)."""
    tmp = Path(delta_dir) / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2))
    tmp.replace(Path(delta_dir) / CONFIG_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class DeltaReader:
    """Opens and validates a delta directory; reads its tensors on demand."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.config = read_config(self.path)
        self._file_of: dict[str, str] = {}
        for file, checksum in self.config.files.items():
            self._index_file(file, checksum if verify else None)
        self._check_complete()

    def _index_file(self, file: str, checksum: str | None) -> None:
        path = self.path / file
        if not path.is_file():
            raise DeltaFormatError(f"{path} is missing; the delta is incomplete, recreate it with `bitdelta compress`")
        if checksum is not None and _sha256(path) != checksum:
            raise DeltaFormatError(f"{path} is corrupted or truncated (checksum mismatch); recreate the delta with `bitdelta compress`")
        try:
            with safe_open(str(path), framework="pt") as handle:
                self._file_of.update(dict.fromkeys(handle.keys(), file))
        except Exception as error:
            raise DeltaFormatError(f"{path} is not a readable safetensors file ({error}); recreate the delta") from None

    def _check_complete(self) -> None:
        expected = [n + suffix for n in self.config.compressed for suffix in (".sign", ".scale")] + list(self.config.dense)
        missing = [n for n in expected if n not in self._file_of]
        if missing:
            raise DeltaFormatError(f"{self.path} lacks tensor {missing[0]} (and {len(missing) - 1} more); the delta is corrupted")

    def _get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path / self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def binary_delta(self, name: str) -> BinaryDelta:
        shape = tuple(self.config.compressed[name])
        delta = BinaryDelta(self._get(name + ".sign"), self._get(name + ".scale"), shape)
        _check_binary_delta(name, delta)
        return delta

    def dense(self, name: str) -> torch.Tensor:
        tensor = self._get(name)
        if list(tensor.shape) != self.config.dense[name]:
            raise DeltaFormatError(f"{name} is {list(tensor.shape)} in the delta file but {self.config.dense[name]} in its config")
        return tensor

    @property
    def nbytes(self) -> int:
        """Bytes of the delta's weight files."""
        return sum((self.path / file).stat().st_size for file in self.config.files)

    def check_base(self, fingerprint: str, base_name: str, base_quant: dict | None = None) -> None:
        """Refuse a base other than the one this delta was made from, or quantized otherwise."""
        if fingerprint != self.config.base_fingerprint:  # first: with another base, the recipe is beside the point
            raise IncompatibleModelsError(
                f"{self.path} was made from base {self.config.base_model!r}, but {base_name!r} has other weights "
                f"(fingerprint {fingerprint} != {self.config.base_fingerprint}); pass the base it was made from"
            )
        check_base_identity(self.config, self.path, fingerprint, base_quant)

    def small_files(self) -> list[Path]:
        """The fine-tune's config, tokenizer and chat template files that travel with the delta."""
        files = model_folder_files(self.path)
        for path in files:
            if not _is_own_file(self.path, path.name):
                raise DeltaFormatError(f"{path} links to a file outside {self.path}; replace the link with the file itself")
        return files


def _check_binary_delta(name: str, delta: BinaryDelta) -> None:
    from bitdelta.pack import packed_words

    *stack, n, k = delta.shape
    signs = (*stack, n, packed_words(k))
    if delta.signs.dtype != torch.int32 or tuple(delta.signs.shape) != signs:
        raise DeltaFormatError(f"{name}.sign has shape {tuple(delta.signs.shape)} {delta.signs.dtype}, expected {signs} int32; the delta is corrupted")
    # one scale per matrix or per row: [1] or [N] for a matrix, [E, 1] or [E, N] for E stacked ones
    scales = ((1,), (n,)) if not stack else ((*stack, 1), (*stack, n))
    if tuple(delta.scale.shape) not in scales or not torch.isfinite(delta.scale).all():
        raise DeltaFormatError(f"{name}.scale is malformed (shape {tuple(delta.scale.shape)} or non-finite); the delta is corrupted")


def check_base_identity(config: DeltaConfig, path: Path, fingerprint: str, base_quant: dict | None) -> None:
    """Refuse a delta made for the base quantized otherwise than `base_quant` ({"recipe", and the
    quantized base's "fingerprint" where the caller knows it}); None: the unquantized base."""
    recipe = None if base_quant is None else base_quant["recipe"]
    if recipe != config.base_recipe:
        made, given = (f"quantized {q}" if q else "unquantized" for q in (config.base_recipe, recipe))
        flag = f"--base-quant {config.base_recipe}" if config.base_recipe else "no --base-quant"
        raise IncompatibleModelsError(f"{path} was made for the {made} base, not the {given} one; use {flag}")
    expected = None if base_quant is None else base_quant.get("fingerprint")
    if fingerprint == config.base_fingerprint and expected is not None and expected != config.base_quant["fingerprint"]:
        raise IncompatibleModelsError(f"{path} was made for this base quantized by another version of {recipe} or other tensors "
                                      f"(fingerprint {expected} != {config.base_quant['fingerprint']}); compress it again over this base")


def read_config(path: Path) -> DeltaConfig:
    file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise DeltaFormatError(f"{path}: no such delta directory; create one with `bitdelta compress`")
    if not file.is_file():
        raise DeltaFormatError(f"{path} is not a bitdelta delta (no {CONFIG_FILE}); create one with `bitdelta compress`")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeltaFormatError(f"{file} is not valid JSON ({error}); the delta is corrupted, recreate it") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise DeltaFormatError(f"{file} has format version {version!r}, but this bitdelta reads version {FORMAT_VERSION}; use a matching bitdelta release")
    try:
        config = DeltaConfig(**data)
    except TypeError as error:
        raise DeltaFormatError(f"{file} does not describe a delta ({error}); the delta is corrupted, recreate it") from None
    if not isinstance(config.files, dict):
        raise DeltaFormatError(f"{file} lists its weight files as {type(config.files).__name__}, not a mapping; the delta is corrupted, recreate it")
    for name in config.files:
        if not _is_own_file(Path(path), name):
            raise DeltaFormatError(f"{file} names weight file {name!r}, which is not a file name inside {path}; the delta is corrupted or forged, recreate it")
    quant = config.base_quant
    if quant is not None and not (isinstance(quant, dict) and all(isinstance(quant.get(key), str) for key in ("recipe", "fingerprint"))):
        raise DeltaFormatError(f"{file} records its quantized base as {quant!r}, not {{\"recipe\": ..., \"fingerprint\": ...}}; "
                               "the delta is corrupted, recreate it")
    return config


def _is_own_file(folder: Path, name: object) -> bool:
    """True when `name` is a plain file name whose file (symlinks followed) lies directly in `folder`.

    A delta may come from anyone: its config must not make us hash, open or copy a file elsewhere.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return False
    try:
        return (folder / name).resolve().parent == folder.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
