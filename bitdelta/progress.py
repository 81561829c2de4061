"""Progress bars (rich) counting tensors and bytes, written to stderr so stdout stays parseable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


@contextlib.contextmanager
def tensor_progress(description: str, total_tensors: int, total_bytes: int, enabled: bool = True) -> Iterator:
    """Yields `advance(nbytes)`, called once per tensor: a bar of bytes processed with the tensor
    count, speed and time left."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tensors]}/" + str(total_tensors) + " tensors"),
               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True) as progress:
        task = progress.add_task(description, total=total_bytes, tensors=0)
        done = 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += 1
            progress.update(task, advance=nbytes, tensors=done)

        yield advance


@contextlib.contextmanager
def step_progress(description: str, total: int, enabled: bool = True) -> Iterator:
    """Yields `advance(note)`: a bar of steps with a free-text note (e.g. the loss)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True) as progress:
        task = progress.add_task(description, total=total, note="")
        yield lambda note="": progress.update(task, advance=1, note=note)
