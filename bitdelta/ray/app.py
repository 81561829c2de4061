"""The application: its settings (RayServeConfig), the builder `serve run` calls (`app`), and
`build_app`, which binds the three deployments together."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ray.serve import Application

from bitdelta.engine import EngineConfig
from bitdelta.errors import BitDeltaError
from bitdelta.server.settings import DEFAULT_MAX_BODY_MB

from .deployments import DeltaCatalog, OpenAIIngress, engine_replica


@dataclass(frozen=True)
class RayServeConfig:
    base: str
    deltas: str  # the shared deltas folder every replica reads (a network file system across hosts)
    engine: EngineConfig = field(default_factory=EngineConfig)
    replicas: int = 1  # fixed replica count, unless min/max replicas turn autoscaling on
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: int | None = None  # autoscaling target per replica; default: half the engine's batch
    gpus_per_replica: float | None = None  # default: the engine's tensor_parallel where it runs on CUDA, else 0
    cpus_per_replica: float = 1.0
    api_key: str | None = None
    admin_key: str | None = None
    max_body_mb: float = DEFAULT_MAX_BODY_MB

    def __post_init__(self) -> None:
        if not Path(self.deltas).is_dir():
            raise BitDeltaError(f"deltas={self.deltas}: no such directory (the shared deltas folder)")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise BitDeltaError("autoscaling needs both min_replicas and max_replicas")
        if self.min_replicas is not None and not 0 < self.min_replicas <= self.max_replicas:
            raise BitDeltaError(f"min_replicas {self.min_replicas} and max_replicas {self.max_replicas}: need 0 < min <= max")
        if self.replicas < 1:
            raise BitDeltaError(f"replicas={self.replicas}: at least 1")

    def replica_options(self) -> dict:
        """Serve options of the engine deployment: replicas or autoscaling, resources, as many
        requests in flight per replica as its engine's batch and queue hold, and as many waiting in
        Serve's router (for a replica that holds the delta, or any with room) as one engine queue
        holds; past that Serve refuses (503 with Retry-After), as a single server's full queue does
        (429), instead of queueing without bound."""
        engine = self.engine
        # a tensor-parallel replica is one actor holding its N GPUs (of one node); its engine starts the other ranks
        gpus = self.gpus_per_replica if self.gpus_per_replica is not None else float(_on_cuda(engine)) * engine.tensor_parallel
        options = {"ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": gpus}, "health_check_period_s": 5,
                   "max_ongoing_requests": engine.max_batch + engine.max_queue, "max_queued_requests": engine.max_queue}
        if self.min_replicas is None:
            return options | {"num_replicas": self.replicas}
        target = self.target_ongoing_requests or max(engine.max_batch // 2, 1)
        return options | {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                                 "target_ongoing_requests": target}}


def build_app(config: RayServeConfig) -> Application:
    """Catalog, engine replicas and the OpenAI ingress, bound into one Serve application."""
    base, deltas = str(config.base), str(Path(config.deltas).resolve())
    catalog = DeltaCatalog.bind(base, deltas, config.engine.base_quant)
    replica_class = engine_replica(max_resident=config.engine.max_cpu_deltas)
    threads = max(int(config.cpus_per_replica), 1)
    replicas = replica_class.options(**config.replica_options()).bind(base, deltas, dataclasses.asdict(config.engine), catalog, threads)
    settings = {"deltas_dir": Path(deltas), "api_key": config.api_key, "admin_key": config.admin_key, "max_body_mb": config.max_body_mb}
    return OpenAIIngress.bind(replicas, catalog, base, deltas, settings)


def app(args: dict) -> Application:
    """The builder of `serve run bitdelta.ray:app base=... deltas=...` and of a `serve deploy`
    config (`import_path: bitdelta.ray:app`, `args: {...}`): see `config_from_args`."""
    return build_app(config_from_args(args))


def config_from_args(args: dict) -> RayServeConfig:
    """Keys: base, deltas, replicas, min_replicas, max_replicas, target_ongoing_requests,
    gpus_per_replica, cpus_per_replica, api_key, admin_key, max_body_mb, and any EngineConfig field
    (max_batch, max_gpu_deltas, max_cpu_deltas, device, dtype, ...)."""
    engine_fields = {f.name: f.type for f in dataclasses.fields(EngineConfig)}
    config_fields = {f.name for f in dataclasses.fields(RayServeConfig)} - {"engine"}
    unknown = set(args) - set(engine_fields) - config_fields
    if unknown:
        raise BitDeltaError(f"unknown argument(s) {', '.join(sorted(unknown))} for bitdelta.ray:app")
    if "base" not in args or "deltas" not in args:
        raise BitDeltaError("bitdelta.ray:app needs base=BASE and deltas=DIR")
    engine = EngineConfig(**{k: _parse(v, engine_fields[k]) for k, v in args.items() if k in engine_fields})
    options = {k: _parse(v, RayServeConfig.__dataclass_fields__[k].type) for k, v in args.items() if k in config_fields}
    return RayServeConfig(engine=engine, **options)


def _parse(value, annotation: str):
    """`serve run` passes every argument as a string; a config file may pass typed values."""
    if not isinstance(value, str) or annotation in ("str", "str | None"):
        return value
    if "bool" in annotation:
        return value.lower() in ("1", "true", "yes")
    if "int" in annotation:
        return int(value)
    if "float" in annotation:
        return float(value)
    return value


def _on_cuda(engine: EngineConfig) -> bool:
    import torch

    return engine.device == "cuda" or (engine.device == "auto" and torch.cuda.is_available())
