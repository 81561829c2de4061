"""The three Ray Serve deployments of a bitdelta application.

    DeltaCatalog   one replica: which deltas of the shared folder are served (POST/DELETE /v1/deltas
                   change it; every other replica follows it)
    EngineReplica  N replicas (one GPU each where there is one): an Engine over the base; each
                   delta it holds is a Serve multiplexed model, so Serve routes a fine-tune's
                   requests to replicas that already hold its delta, and Serve's LRU eviction
                   evicts the delta from the engine's store. Batching across fine-tunes happens in
                   the engine, not in Serve (@serve.batch would split batches by model id).
    OpenAIIngress  the same FastAPI app as `bitdelta serve` (bitdelta.server.app) over a RayBackend
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from bitdelta.errors import UnknownModelError

from .backend import RayBackend

log = logging.getLogger("bitdelta.ray")
CATALOG_POLL_SECONDS = 1.0  # how soon a replica sees a delta unloaded through the admin API


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class DeltaCatalog:
    """The served deltas of the shared folder: those that fit the base at startup, then whatever
    the admin API adds and removes. Checked from their configs and headers (the base's fingerprint
    and architecture); replicas verify checksums and shapes when they load a delta."""

    def __init__(self, base: str, deltas_dir: str, base_quant: str | None = None):
        from bitdelta.checkpoint import Checkpoint

        checkpoint = Checkpoint(base)
        self.base_name = Path(base).name if Path(base).is_dir() else base
        self.fingerprint, self.model_type = checkpoint.fingerprint, checkpoint.config.get("model_type", "unknown")
        self.deltas_dir = Path(deltas_dir)
        self.base_quant = None if base_quant is None else {"recipe": base_quant}  # the replicas check the quantized base's fingerprint
        self.served: set[str] = set()
        self.version = 0
        for folder in sorted(self.deltas_dir.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                try:
                    self._check(folder.name, verify=False)
                    self.served.add(folder.name)
                except Exception as error:  # noqa: BLE001 -- one bad folder must not keep the rest from serving
                    log.warning("not serving %s: %s", folder.name, error)

    def _check(self, name: str, verify: bool) -> Path:
        from bitdelta.engine.store import check_base
        from bitdelta.fileformat import DeltaReader
        from bitdelta.server.settings import delta_folder

        folder = delta_folder(self.deltas_dir, name)
        check_base(DeltaReader(folder, verify=verify).config, self.fingerprint, self.model_type, folder, self.base_quant)
        return folder

    def snapshot(self) -> tuple[int, list[str]]:
        """(version, the base then every served delta)."""
        return self.version, [self.base_name, *sorted(self.served)]

    def add(self, name: str) -> None:
        self._check(name, verify=True)
        self.served.add(name)
        self.version += 1

    def remove(self, name: str) -> None:
        if name not in self.served:
            raise UnknownModelError(f"the model {name!r} does not exist; GET /v1/models lists the served models")
        self.served.discard(name)
        self.version += 1


class ResidentDelta:
    """Serve's handle on a delta held by a replica: when Serve's LRU drops it (or the replica
    stops), the delta leaves the engine's memory."""

    def __init__(self, store, name: str):
        self.store, self.name, self.evicted = store, name, False

    def __del__(self) -> None:  # Serve calls it on unload; the collector may call it again
        if not self.evicted:
            self.evicted = True
            self.store.evict(self.name)


def engine_replica(max_resident: int):
    """The EngineReplica deployment class with `max_resident` deltas per replica (Serve fixes the
    multiplexing capacity when the loader is decorated, hence a class made per capacity)."""

    @serve.deployment
    class EngineReplica:
        def __init__(self, base: str, deltas_dir: str, engine_config: dict, catalog: DeploymentHandle, torch_threads: int):
            import torch

            from bitdelta.engine import Engine, EngineConfig
            from bitdelta.server.backend import LocalBackend

            torch.set_num_threads(torch_threads)
            self.engine = Engine(base, EngineConfig(**engine_config))
            self.local = LocalBackend(self.engine)
            self.deltas_dir, self.catalog = Path(deltas_dir), catalog
            self.base_name = self.engine.store.names()[0]
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            self.engine.start()
            self.follower = asyncio.get_event_loop().create_task(self._follow_catalog())

        async def describe(self) -> dict:
            return {"base": self.base_name, "context": self.engine.context, "replica": self.replica_id}

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def resident(self, name: str) -> ResidentDelta:
            from bitdelta.server.settings import delta_folder

            store = self.engine.store
            if name not in store.names():
                await asyncio.to_thread(store.register, name, delta_folder(self.deltas_dir, name))
            await asyncio.to_thread(store.preload, name)
            return ResidentDelta(store, name)

        async def generate(self, model: str, prompt: list[int], params, stream: bool = True):
            """The replica's id, then the request's Output events in lists: each item sent is every
            event ready at that moment, so a busy replica pays Ray's per-item cost once per
            batch of tokens, not per token; all of them in one list at the end when the client
            does not stream. (`model` is also the request's multiplexed model id, which Serve's
            router used to choose this replica.)"""
            if model != self.base_name:
                await self.resident(model)
            generation = await self.local.generate(model, prompt, params)
            yield self.replica_id
            if stream:
                async for outputs in _ready_batches(generation.outputs):
                    yield outputs
            else:
                async with contextlib.aclosing(generation.outputs) as outputs:  # closing cancels the request
                    yield [output async for output in outputs]

        def stats(self) -> dict:
            return self.engine.stats() | {"replica": self.replica_id, "models": self.engine.store.names()}

        def check_health(self) -> None:
            if not self.engine.running:
                raise RuntimeError("the engine's scheduler thread has stopped")

        async def _follow_catalog(self) -> None:
            """Unregister deltas the admin API removed, within CATALOG_POLL_SECONDS."""
            while True:
                await asyncio.sleep(CATALOG_POLL_SECONDS)
                try:
                    _, served = await self.catalog.snapshot.remote()
                except Exception:  # noqa: BLE001 -- the catalog restarting: try again next round
                    continue
                for name in set(self.engine.store.names()) - set(served):
                    self.engine.store.unregister(name)

        def __del__(self) -> None:
            self.engine.stop()

    return EngineReplica


async def _ready_batches(outputs) -> AsyncIterator[list]:
    """The events of `outputs` in lists of those that are ready together (one await per list)."""
    pending: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for output in outputs:
                pending.put_nowait(output)
        except Exception as error:  # noqa: BLE001 -- handed to the reader, which raises it
            pending.put_nowait(error)
        pending.put_nowait(None)

    reader = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            batch = [await pending.get()]
            while not pending.empty():
                batch.append(pending.get_nowait())
            if errors := [o for o in batch if isinstance(o, Exception)]:
                raise errors[0]
            done = batch[-1] is None
            if batch := [o for o in batch if o is not None]:
                yield batch
            if done:
                return
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)  # the engine request is cancelled before this returns


# An async proxy: it holds many requests at once (Serve's default of 5 in flight would cap the
# whole application at 5 concurrent requests, whatever the engine replicas could batch).
INGRESS_MAX_ONGOING = 4096


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress()
class OpenAIIngress:
    """`bitdelta serve`'s OpenAI app, its requests sent to the engine replicas."""

    def __init__(self, replicas: DeploymentHandle, catalog: DeploymentHandle, base: str, deltas_dir: str, settings: dict):
        self.backend = RayBackend(replicas, catalog, base, Path(deltas_dir))
        self.settings = settings

    async def __serve_build_asgi_app__(self):
        from bitdelta.server.app import create_app
        from bitdelta.server.settings import ServerSettings
        from bitdelta.server.metrics import Metrics

        await self.backend.start()
        return create_app(self.backend, Metrics(), ServerSettings(**self.settings))
