"""Crash-safe output: directories appear whole or not at all, tensors go to size-bounded shards."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitdelta.errors import OutputExistsError


@contextlib.contextmanager
def atomic_directory(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success rename it to `output`.

    The temporary directory lives in the same folder so the final rename is atomic. On any error
    it is removed and `output` is left exactly as it was.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; choose another path or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            retired = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            output.rename(retired)
            tmp.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Streams named tensors into safetensors shards of at most `max_shard_bytes` each.

    Only the current shard is held in memory. `finish` names the shards the way Hugging Face does
    (`{stem}.safetensors`, or `{stem}-00001-of-00003.safetensors` plus `{stem}.safetensors.index.json`).
    """

    def __init__(self, folder: Path, stem: str, max_shard_bytes: int):
        self.folder, self.stem, self.max_shard_bytes = Path(folder), stem, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".{self.stem}.part{len(self._shards)}"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name; return the file names written."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = f"{self.stem}.safetensors"
            self._shards[0][0].rename(self.folder / final)
            return [final]
        weight_map, names = {}, []
        for index, (path, tensors) in enumerate(self._shards, start=1):
            final = f"{self.stem}-{index:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            names.append(final)
            weight_map.update(dict.fromkeys(tensors, final))
        index_file = f"{self.stem}.safetensors.index.json"
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / index_file).write_text(json.dumps(index, indent=2))
        return names + [index_file]
