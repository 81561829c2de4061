"""What the HTTP layer asks of whatever generates tokens: the served models and their tokenizers,
generation as a stream of Output events, and the admin verbs.

Two implementations share the one OpenAI app (app.py): `LocalBackend`, an Engine in this process
(`bitdelta serve`), and `bitdelta.ray.RayBackend`, Ray Serve replicas behind a deployment handle
(`bitdelta serve --replicas N`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bitdelta.engine import Engine, Output, SamplingParams
from bitdelta.engine.store import DeltaEntry
from bitdelta.errors import BitDeltaError


class Unavailable(BitDeltaError):
    """No server process can take the request now (a replica died or is restarting): HTTP 503, retry."""


@dataclass
class Generation:
    """One request on its way: its Output events, and which server process produces them."""

    outputs: AsyncIterator[Output]  # ends after the event with a finish_reason; closing it cancels the request
    served_by: str | None = None


class Backend(Protocol):
    context: int  # tokens a request may span (prompt + completion)

    def names(self) -> list[str]: ...  # every served model, the base first
    def get(self, name: str) -> DeltaEntry: ...  # its tokenizer and chat template; UnknownModelError if not served
    # refusals raise here; `stream`: whether the client reads the events as they come (a backend
    # whose events cross processes may deliver a non-streamed request's events at its end, at once)
    async def generate(self, model: str, prompt: list[int], params: SamplingParams, stream: bool = True) -> Generation: ...
    async def add(self, name: str, folder: Path) -> None: ...  # serve a delta folder (validated) under `name`
    async def remove(self, name: str) -> None: ...
    def healthy(self) -> bool: ...


class LocalBackend:
    """The engine of this process; requests reach its scheduler thread through `submit`."""

    def __init__(self, engine: Engine):
        self.engine, self.context = engine, engine.context

    def names(self) -> list[str]:
        return self.engine.store.names()

    def get(self, name: str) -> DeltaEntry:
        return self.engine.store.get(name)

    async def generate(self, model: str, prompt: list[int], params: SamplingParams, stream: bool = True) -> Generation:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Output] = asyncio.Queue()
        request_id = self.engine.submit(model, prompt, params, lambda out: loop.call_soon_threadsafe(events.put_nowait, out))
        return Generation(_until_finished(events, lambda: self.engine.cancel(request_id)))

    async def add(self, name: str, folder: Path) -> None:
        await asyncio.to_thread(self.engine.store.register, name, folder, True)

    async def remove(self, name: str) -> None:
        self.engine.store.unregister(name)

    def healthy(self) -> bool:
        return self.engine.running


async def _until_finished(events: asyncio.Queue, cancel) -> AsyncIterator[Output]:
    finished = False
    try:
        while not finished:
            output = await events.get()
            finished = output.finish_reason is not None
            yield output
    finally:
        if not finished:
            cancel()
