"""Crash-safe output: directories appear whole or not at all, tensors go to size-bounded shards."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bitdelta.checkpoint import SAFETENSORS_DTYPES
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
    refuse_existing(output, overwrite)
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


def refuse_existing(output: Path, overwrite: bool) -> None:
    """OutputExistsError if something is at `output` and `overwrite` is off. atomic_directory checks
    this; commands also check it before reading their inputs, which can take minutes."""
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

    Each tensor's bytes go to disk as it arrives, so memory holds no shard whatever its size.
    `finish` names the shards the way Hugging Face does (`{stem}.safetensors`, or
    `{stem}-00001-of-00003.safetensors` plus `{stem}.safetensors.index.json`).
    """

    def __init__(self, folder: Path, stem: str, max_shard_bytes: int):
        self.folder, self.stem, self.max_shard_bytes = Path(folder), stem, max_shard_bytes
        self._current: _ShardFile | None = None
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._current is not None and self._current.nbytes + size > self.max_shard_bytes:
            self._close_shard()
        if self._current is None:
            self._current = _ShardFile(self.folder / f".{self.stem}.part{len(self._shards)}")
        self._current.add(name, tensor)
        self.total_bytes += size

    def _close_shard(self) -> None:
        shard = self._current or _ShardFile(self.folder / f".{self.stem}.part{len(self._shards)}")
        self._shards.append((shard.path, shard.close()))
        self._current = None

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name; return the file names written."""
        if self._current is not None or not self._shards:
            self._close_shard()
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


@dataclass(frozen=True)
class _Stored:
    dtype: str  # safetensors' name
    shape: list[int]
    offset: int  # in the data file
    nbytes: int


class _ShardFile:
    """One safetensors file in the making. Tensor bytes are appended to `path`.data as they arrive;
    `close` writes `path` (8-byte header length, JSON header, data) with the data copied over in
    bounded pieces, laid out exactly as safetensors' own save_file lays them out, then deletes the
    data file."""

    def __init__(self, path: Path):
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._stored: dict[str, _Stored] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._stored:
            raise ValueError(f"tensor {name} was already written")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._stored[name] = _Stored(_SAFETENSORS_NAMES[tensor.dtype], list(tensor.shape), self.nbytes, raw.nbytes)
        self._data.write(raw)
        self.nbytes += raw.nbytes

    def close(self) -> list[str]:
        """Write the shard; return its tensor names in file order."""
        self._data.close()
        # safetensors' order: by dtype, widest first (so every tensor is aligned to its element
        # size once the header is padded to 8 bytes), then by name
        order = sorted(self._stored, key=lambda name: (-_DTYPE_ORDER.index(self._stored[name].dtype), name))
        header: dict = {"__metadata__": {"format": "pt"}}
        begin = 0
        for name in order:
            stored = self._stored[name]
            header[name] = {"dtype": stored.dtype, "shape": stored.shape, "data_offsets": [begin, begin + stored.nbytes]}
            begin += stored.nbytes
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(self._data_path, "rb") as source, open(self.path, "wb") as target:
            target.write(struct.pack("<Q", len(encoded)) + encoded)
            target.flush()
            for name in order:
                _append_range(source.fileno(), target.fileno(), self._stored[name].offset, self._stored[name].nbytes)
        self._data_path.unlink()
        return order


def _append_range(source: int, target: int, offset: int, length: int) -> None:
    """Append bytes [offset, offset + length) of file `source` to file `target`, 8 MB at a time.

    os.copy_file_range copies inside the kernel, never through this process's memory (measured here:
    0.4 s of system time for 1.3 GB, against 0.5-4.7 s for a read/write loop). Where it is missing
    (not Linux) or refused (some file systems), the bytes go through memory.
    """
    end = offset + length
    while offset < end:
        count = min(end - offset, _COPY_BYTES)
        copied = None
        if _kernel_copy is not None:
            try:
                copied = _kernel_copy(source, target, count, offset)
            except OSError as error:
                if error.errno not in _KERNEL_COPY_REFUSED:
                    raise
        if copied is None:
            copied = os.write(target, os.pread(source, count, offset))
        if not copied:
            raise OSError(errno.EIO, f"a shard's data file ended {end - offset} bytes early")
        offset += copied


_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# safetensors' Dtype enum, in declaration order: a file lists its tensors by this order, descending
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_COPY_BYTES = 8 << 20
_kernel_copy = getattr(os, "copy_file_range", None)
_KERNEL_COPY_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}
