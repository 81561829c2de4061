"""Progress on stderr (stdout stays parseable): a rich bar on a terminal, and where stderr is not a
terminal (a log file, CI, a pipe), where a live bar shows nothing until it ends, a plain line at
least every LINE_SECONDS."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

LINE_SECONDS = 5.0


@contextlib.contextmanager
def tensor_progress(description: str, total_tensors: int, total_bytes: int, enabled: bool = True) -> Iterator:
    """Yields `advance(nbytes)`, called once per tensor: a bar of bytes processed with the tensor
    count, speed and time left."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tensors]}/" + str(total_tensors) + " tensors"),
               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    done = 0
    with _progress(description, total_bytes, columns, enabled, lambda bytes_done: f"{done}/{total_tensors} tensors, "
                   f"{bytes_done / 1e9:.2f} of {total_bytes / 1e9:.2f} GB") as update:

        def advance(nbytes: int) -> None:
            nonlocal done
            done += 1
            update(nbytes, tensors=done)

        yield advance


@contextlib.contextmanager
def step_progress(description: str, total: int, enabled: bool = True) -> Iterator:
    """Yields `advance(note)`: a bar of steps with a free-text note (e.g. the loss)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeRemainingColumn())
    note = ""
    with _progress(description, total, columns, enabled, lambda steps: f"{steps:g}/{total} {note}".rstrip(), note="") as update:

        def advance(text: str = "") -> None:
            nonlocal note
            note = text
            update(1, note=text)

        yield advance


@contextlib.contextmanager
def _progress(description: str, total: float, columns: tuple, enabled: bool, line: Callable[[float], str], **fields) -> Iterator:
    """Yields `update(advance, **fields)` of a bar on a terminal, or of timed lines elsewhere."""
    console = Console(stderr=True)
    if not enabled or console.is_terminal:
        with Progress(*columns, console=console, disable=not enabled, transient=True) as progress:
            task = progress.add_task(description, total=total, **fields)
            yield lambda advance, **values: progress.update(task, advance=advance, **values)
        return
    start = last = time.monotonic()
    completed = 0.0

    def update(advance: float, **_) -> None:
        nonlocal completed, last
        completed += advance
        now = time.monotonic()
        if now - last >= LINE_SECONDS or completed >= total:
            last = now
            print(f"{description}: {line(completed)} ({now - start:.0f} s)", file=sys.stderr, flush=True)

    yield update
