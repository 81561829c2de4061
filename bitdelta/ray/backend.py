"""RayBackend: the OpenAI app's Backend (bitdelta.server.backend) over Ray Serve deployment handles.

Requests go to the EngineReplica deployment with the fine-tune's name as the multiplexed model id,
so Serve's router prefers a replica that already holds the delta; the base goes to any replica.
Tokenizers and chat templates are read here from the shared folders (the replicas only see token
ids). The served names follow the DeltaCatalog deployment, refreshed every CATALOG_POLL_SECONDS
and at once after this ingress changes it. A replica that dies or a full Serve queue becomes a
503 with Retry-After; errors the engine raises (a full queue, a bad request) keep their meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from bitdelta.engine.store import DeltaEntry
from bitdelta.errors import BitDeltaError, UnknownModelError
from bitdelta.server.backend import Generation, Unavailable

CATALOG_POLL_SECONDS = 1.0


class RayBackend:
    def __init__(self, replicas, catalog, base: str, deltas_dir: Path):
        self.replicas, self.catalog, self.deltas_dir = replicas, catalog, deltas_dir
        self.base_dir = base
        self._served: list[str] = []
        self._entries: dict[str, DeltaEntry] = {}
        self.context = 0

    async def start(self) -> None:
        """Ask a replica what it serves (the context), read the catalog, then follow it."""
        from bitdelta.checkpoint import resolve_model_dir

        info = await self.replicas.describe.remote()
        self.context = info["context"]
        self._entries[info["base"]] = DeltaEntry(info["base"], None, resolve_model_dir(self.base_dir), is_base=True)
        await self._refresh()
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _refresh(self) -> None:
        _, self._served = await self.catalog.snapshot.remote()
        for name in set(self._entries) - set(self._served):
            del self._entries[name]

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(CATALOG_POLL_SECONDS)
            try:
                await self._refresh()
            except Exception:  # noqa: BLE001 -- the catalog restarting: keep the last view
                continue

    def names(self) -> list[str]:
        return list(self._served)

    def get(self, name: str) -> DeltaEntry:
        if name not in self._served:
            raise UnknownModelError(f"the model {name!r} does not exist; GET /v1/models lists the served models")
        if name not in self._entries:
            base = self._entries[self._served[0]]
            folder = self.deltas_dir / name
            self._entries[name] = DeltaEntry(name, folder, folder if (folder / "tokenizer_config.json").is_file() else base.tokenizer_dir, base=base)
        return self._entries[name]

    async def generate(self, model: str, prompt: list[int], params, stream: bool = True) -> Generation:
        handle = self.replicas.options(stream=True, **({} if model == self._served[0] else {"multiplexed_model_id": model}))
        stream = None
        try:
            stream = handle.generate.remote(model, prompt, params, stream)
            served_by = await stream.__anext__()
        except BaseException as error:  # Serve's back pressure, a dead replica, or the engine's refusal
            _cancel(stream)
            raise _as_bitdelta_error(error) from None
        return Generation(_outputs(stream), served_by)

    async def add(self, name: str, folder: Path) -> None:
        try:
            await self.catalog.add.remote(name)
        except BaseException as error:
            raise _as_bitdelta_error(error) from None
        await self._refresh()

    async def remove(self, name: str) -> None:
        try:
            await self.catalog.remove.remote(name)
        except BaseException as error:
            raise _as_bitdelta_error(error) from None
        await self._refresh()

    def healthy(self) -> bool:
        return True  # Serve checks each replica's health itself (EngineReplica.check_health)


async def _outputs(stream) -> AsyncIterator:
    finished = False
    try:
        async for outputs in stream:  # lists of the events that were ready together
            for output in outputs:
                finished = output.finish_reason is not None
                yield output
    except Exception as error:  # noqa: BLE001 -- a replica that died mid-request: a retryable error
        raise _as_bitdelta_error(error) from None
    finally:
        if not finished:
            _cancel(stream)


def _cancel(stream) -> None:
    """Cancel a request sent to the replicas; one that never reached a replica may raise its own
    refusal again here, which is already being answered."""
    with contextlib.suppress(Exception):
        if stream is not None:
            stream.cancel()


def _as_bitdelta_error(error: BaseException) -> BaseException:
    """What a client should see: our own errors as they were raised in the replica (Ray re-raises
    them wrapped, the original as `.cause`), Serve's back pressure and dead or restarting replicas
    as Unavailable (503, retry); cancellation untouched."""
    if isinstance(error, asyncio.CancelledError):
        return error
    cause = getattr(error, "cause", error)
    if isinstance(cause, BitDeltaError):
        return cause
    return Unavailable(f"no replica could take the request ({type(cause).__name__}); retry shortly")
