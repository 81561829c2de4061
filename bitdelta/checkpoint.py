"""Read Hugging Face checkpoints tensor by tensor: local directories or hub ids, sharded or not.

Nothing here loads a whole model: tensors are read one at a time from memory-mapped safetensors
files, and each file is closed again so its pages leave the process with the tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from bitdelta.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The files besides its weights that a model folder needs to load and chat: they travel from a
# fine-tune into its delta and from a delta into a merged checkpoint. An allowlist, because a folder
# may come from anyone: pickles, remote code and unknown binaries never travel.
MODEL_FOLDER_FILES = frozenset({
    "config.json", "generation_config.json", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model",  # sentencepiece
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.tiktoken", "qwen.tiktoken", "tiktoken.model",  # BPE, WordPiece, tiktoken
    "chat_template.jinja", "chat_template.json",
})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


def resolve_model_dir(model: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; a hub id (`org/name`) downloaded (or found in the cache) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file; pass the model's directory")
    if not _HUB_ID.match(str(model)):
        raise CheckpointError(f"{model}: no such directory; pass a local model directory or a hub id like org/name")
    return _download(str(model), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.model", "*.txt", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: not a local directory, and the Hugging Face hub cannot be reached (offline?) "
            "with no cached copy; pass a local model directory"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hugging Face hub (or it is private: run `hf auth login`)") from None
    except Exception as error:  # network and HTTP errors come in many classes across hub versions
        raise CheckpointError(f"{repo_id}: download from the Hugging Face hub failed ({type(error).__name__}: {error})") from None


class Checkpoint:
    """A safetensors checkpoint directory: tensor names, shapes and dtypes, and tensors on demand."""

    def __init__(self, model: str | Path, revision: str | None = None):
        self.name = str(model)
        self.path = resolve_model_dir(model, revision)
        self.files = self._weight_files()
        self.tensors = self._read_headers()

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index ({error}); re-download the checkpoint") from None
            return sorted(set(weight_map.values()))
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if found:
            raise CheckpointError(f"{self.path} has several .safetensors files but no {INDEX_FILE}; add the index file")
        if any(self.path.glob("*.bin")):
            raise CheckpointError(
                f"{self.path} holds only pickle (.bin) weights, which bitdelta never loads; "
                "convert them with `model.save_pretrained(dir, safe_serialization=True)`"
            )
        raise CheckpointError(f"{self.path} has no model weights (*.safetensors); pass a Hugging Face model directory")

    def _read_headers(self) -> dict[str, TensorMeta]:
        tensors: dict[str, TensorMeta] = {}
        for file in self.files:
            with self._open(file) as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    tensors[name] = TensorMeta(tuple(view.get_shape()), SAFETENSORS_DTYPES[view.get_dtype()], file)
        return tensors

    def _open(self, file: str):
        path = self.path / file
        try:
            return safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, re-download it") from None
        except Exception as error:
            raise CheckpointError(f"{path} cannot be read ({error}); the file is corrupted or truncated") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor in memory of its own, to keep or to modify."""
        return self.mapped(name).clone()

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor as safetensors hands it out: where it can, a view of the memory-mapped file, no
        copy. Its pages are resident while it is held and leave the process with it: read it, then drop it."""
        with self._open(self.tensors[name].file) as handle:
            return handle.get_tensor(name)

    def part(self, name: str, rows: slice = slice(None), columns: slice = slice(None)) -> torch.Tensor:
        """Rows and/or columns of a tensor, read alone from the file (a tensor-parallel rank's share)."""
        with self._open(self.tensors[name].file) as handle:
            view = handle.get_slice(name)
            return view[rows] if len(self.tensors[name].shape) == 1 else view[rows, columns]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, in file order, mapped (see `mapped`): a caller that drops each before the
        next holds one tensor's pages at a time, never the rest of its shard."""
        for name in self.tensors:
            yield name, self.mapped(name)

    @cached_property
    def config(self) -> dict:
        path = self.path / "config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} has no config.json; pass a Hugging Face model directory") from None
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path} is not valid JSON ({error})") from None

    @property
    def nbytes(self) -> int:
        return sum(meta.nbytes for meta in self.tensors.values())

    def small_files(self) -> list[Path]:
        """The config, tokenizer and chat template files (MODEL_FOLDER_FILES) this checkpoint has."""
        return model_folder_files(self.path)

    @cached_property
    def fingerprint(self) -> str:
        """A cheap identity of the weights: names, shapes, dtypes and a few values of every tensor.

        Reads a corner of each tensor through the memory map, so it costs milliseconds even for
        a 70B model, yet two independently trained (or fine-tuned) models never collide.
        """
        digest = hashlib.sha256()
        for file in self.files:
            with self._open(file) as handle:
                for name in sorted(handle.keys()):
                    meta = self.tensors[name]
                    digest.update(f"{name}|{meta.shape}|{meta.dtype}".encode())
                    digest.update(_corner(handle.get_slice(name), meta.shape).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]


def model_folder_files(folder: Path) -> list[Path]:
    """The MODEL_FOLDER_FILES present in `folder`, sorted."""
    return sorted(folder / name for name in MODEL_FOLDER_FILES if (folder / name).is_file())


def _corner(view, shape: tuple[int, ...]) -> torch.Tensor:
    """The first and last few values of a tensor, read without loading the rest."""
    if not shape or 0 in shape:
        return torch.zeros(0)
    if len(shape) == 1:
        parts = [view[:16], view[max(shape[0] - 16, 0):]]
    else:
        parts = [view[:1, :16], view[shape[0] - 1:, max(shape[1] - 16, 0):]]
    return torch.cat([p.reshape(-1) for p in parts]).contiguous()
