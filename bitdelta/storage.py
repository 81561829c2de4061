"""Crash-safe output: directories appear whole or not at all, tensors go to size-bounded shards."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitdelta.errors import OutputExistsError, OutputWriteError


@contextlib.contextmanager
def atomic_directory(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success rename it to `output`.

    The temporary directory lives in the same folder so the final rename is atomic. On any error
    it is removed and `output` is left exactly as it was; an OSError (a full disk, a folder that
    cannot be written) becomes an OutputWriteError naming `output`. `overwrite` replaces whatever
    is at `output` itself: a directory, a file, or a symbolic link (the link, never its target).
    """
    output = Path(output)
    _refuse_existing(output, overwrite)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as error:
        raise OutputWriteError(_write_failure(error, output)) from error
    try:
        yield tmp
        _replace(output, tmp)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(_write_failure(error, output)) from error
    except OutputWriteError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(error.__cause__, OSError):
            raise
        # from an atomic directory nested in this one: name the output the user asked for
        raise OutputWriteError(_write_failure(error.__cause__, output)) from error.__cause__
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_existing(output: Path, overwrite: bool) -> None:
    if overwrite or not os.path.lexists(output):  # lexists: a dangling link is in the way too
        return
    if output.is_symlink():
        raise OutputExistsError(f"{output} already exists as a symbolic link to {os.readlink(output)}; "
                                "choose another path or pass --overwrite to replace the link (not its target)")
    raise OutputExistsError(f"{output} already exists; choose another path or pass --overwrite")


def _replace(output: Path, tmp: Path) -> None:
    """Rename `tmp` to `output`, retiring whatever is there first (a rename moves a link, not its target)."""
    if not os.path.lexists(output):
        tmp.rename(output)
        return
    retired = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    output.rename(retired)
    try:
        tmp.rename(output)
    except OSError:
        retired.rename(output)
        raise
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired, ignore_errors=True)
    else:
        retired.unlink()


def _write_failure(error: OSError, output: Path) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {output}; free space or choose another -o"
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where} while writing {output}; fix that path or choose another -o"


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
