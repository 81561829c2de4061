"""`bitdelta serve`: start the engine and the HTTP server.

`serve` is a typer command function (registered as `bitdelta serve`; `python -m bitdelta.server`
runs it alone); `run_server` is the same as a Python call.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import sys
from pathlib import Path
from typing import Annotated

import typer

from bitdelta.display import count
from bitdelta.engine.config import EngineConfig
from bitdelta.errors import BitDeltaError

from .settings import DEFAULT_MAX_BODY_MB, ServerSettings, delta_folder, valid_delta_name

# The engine, the app and the metrics (torch, FastAPI) are imported where a server is built, so
# `bitdelta serve --help` and argument errors answer at once.

log = logging.getLogger("bitdelta.server")
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_server(
    base: str,
    deltas_dir: Path | None = None,
    extra_deltas: dict[str, Path] | None = None,
    config: EngineConfig = EngineConfig(),
    api_key: str | None = None,
    admin_key: str | None = None,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
):
    """The engine (not started) and its FastAPI app. Every valid subfolder of `deltas_dir` is served
    under its folder name (others are skipped with a warning, so one bad delta cannot keep the
    rest from serving; `delta_folder` is the rule, the same as POST /v1/deltas applies);
    `extra_deltas` (NAME -> PATH, given by the operator) must all be valid."""
    from bitdelta.engine import Engine

    from .app import create_app
    from .backend import LocalBackend
    from .metrics import Metrics

    if deltas_dir is not None and not Path(deltas_dir).is_dir():
        raise BitDeltaError(f"--deltas {deltas_dir}: no such directory")
    metrics = Metrics()
    engine = Engine(base, config, metrics)
    metrics.bind(engine)
    if deltas_dir is not None:
        _register_folder(engine, Path(deltas_dir))
    for name, path in (extra_deltas or {}).items():
        engine.store.register(name, path)
    settings = ServerSettings(Path(deltas_dir) if deltas_dir else None, api_key, admin_key, max_body_mb)
    return engine, create_app(LocalBackend(engine), metrics, settings)


def _register_folder(engine, deltas_dir: Path) -> None:
    """Serve every delta folder of `deltas_dir` that fits the base; log why each other one does not.
    A folder none of whose deltas fits is almost always the wrong base or the wrong folder: refuse it."""
    candidates = [f for f in sorted(deltas_dir.iterdir()) if f.is_dir() and not f.name.startswith(".")]
    refused = []
    for folder in candidates:
        try:
            engine.store.register(folder.name, delta_folder(deltas_dir, folder.name))
        except BitDeltaError as error:
            log.warning("not serving %s: %s", folder.name, error)
            refused.append(f"{folder.name}: {error}")
    if candidates and len(refused) == len(candidates):
        raise BitDeltaError(f"none of the {len(candidates)} folders in --deltas {deltas_dir} can be served over this base "
                            f"(first: {refused[0]}); check --deltas and the base")
    log.info("serving %d of the %s in %s", len(candidates) - len(refused), count(len(candidates), "delta folder"), deltas_dir)


def logging_config(level: str) -> dict:
    """uvicorn's logging configuration, with bitdelta's loggers (engine, server, access log) beside
    uvicorn's, in its format, at `level`."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["bitdelta"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    config["loggers"]["uvicorn"]["level"] = level.upper()
    return config


def run_server(base: str, deltas_dir: Path | None = None, extra_deltas: dict[str, Path] | None = None, host: str = "127.0.0.1", port: int = 8000,
               config: EngineConfig = EngineConfig(), api_key: str | None = None, admin_key: str | None = None,
               max_body_mb: float = DEFAULT_MAX_BODY_MB, log_level: str = "info") -> None:
    """Serve `base` and its deltas on http://host:port until interrupted."""
    import uvicorn

    log_config = logging_config(log_level)
    logging.config.dictConfig(log_config)
    engine, app = build_server(base, deltas_dir, extra_deltas, config, api_key, admin_key, max_body_mb)
    names = engine.store.names()
    log.info("serving %s and %s on http://%s:%d/v1 (%s, %s)", names[0], count(len(names) - 1, "delta"), host, port, engine.model.device, engine.model.dtype)
    engine.start()
    try:  # uvicorn's own access log is off: bitdelta.access logs each request with its model and tokens
        uvicorn.run(app, host=host, port=port, log_config=log_config, log_level=log_level, access_log=False)
    finally:
        engine.stop()


def _parse_deltas(items: list[str]) -> dict[str, Path]:
    deltas = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not valid_delta_name(name) or not path:
            raise BitDeltaError(f"--delta {item!r}: use NAME=PATH with a name of letters, digits, . _ -")
        deltas[name] = Path(path)
    return deltas


def serve(
    base: Annotated[str, typer.Argument(help="Base model: local directory or hub id (served under its folder name).")],
    deltas: Annotated[Path | None, typer.Option("--deltas", help="Directory whose every subfolder is a delta, served under the folder's name; POST /v1/deltas loads from here.")] = None,
    delta: Annotated[list[str], typer.Option("--delta", help="Another delta as NAME=PATH (repeatable).")] = [],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option("--device", help="cuda or cpu (default: cuda when available).")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (float32 on cpu, the base's half type on cuda), bfloat16, float16 or float32.")] = "auto",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Sequences in the running batch.")] = 64,
    max_gpu_deltas: Annotated[int, typer.Option("--max-gpu-deltas", min=1, help="Delta slots on the device.")] = 32,
    max_cpu_deltas: Annotated[int, typer.Option("--max-cpu-deltas", min=1, help="Deltas kept in (pinned) CPU memory.")] = 256,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests waiting for the batch; more get 429.")] = 1024,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body in MB; larger ones get 413 before they are read.")] = DEFAULT_MAX_BODY_MB,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", min=1, help="Prompt tokens prefilled per step beside the decoding rows: larger gives sooner first tokens and longer pauses for the decoders.")] = EngineConfig.prefill_chunk,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay decode steps as CUDA graphs on a GPU.")] = True,
    tensor_parallel: Annotated[int, typer.Option("--tensor-parallel", min=1, help="Split the base and every delta over this many GPUs (one process each; gloo ranks with --device cpu).")] = 1,
    base_quant: Annotated[str | None, typer.Option("--base-quant", help="Hold the base's block matrices (linears, MoE experts) quantized: int8, fp8 or int4; serves the deltas compressed with the same --base-quant.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="BITDELTA_API_KEY", help="Bearer token required on every endpoint but /health.")] = None,
    admin_key: Annotated[str | None, typer.Option("--admin-key", envvar="BITDELTA_ADMIN_KEY", help="Bearer token for /v1/deltas (default: --api-key).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info (a line per request), warning or error.")] = "info",
    replicas: Annotated[int | None, typer.Option("--replicas", min=1, help="Serve with this many engine replicas on Ray Serve (pip install 'bitdelta\\[ray]'); without it, one engine in this process.")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to deploy on (default: start a local one).")] = None,
    min_replicas: Annotated[int | None, typer.Option("--min-replicas", min=1, help="Autoscale the replicas between --min-replicas and --max-replicas on ongoing requests.")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max-replicas", min=1, help="Upper bound of autoscaling.")] = None,
    target_ongoing_requests: Annotated[int | None, typer.Option("--target-ongoing-requests", min=1, help="Autoscaling target per replica (default: half of --max-batch).")] = None,
) -> None:
    """Serve BASE and many 1-bit fine-tunes of it behind an OpenAI-compatible API."""
    if device not in ("auto", "cuda", "cpu"):
        raise BitDeltaError(f"--device {device!r}: use cuda or cpu")
    if log_level not in LOG_LEVELS:
        raise BitDeltaError(f"--log-level {log_level!r}: use {', '.join(LOG_LEVELS)}")
    config = EngineConfig(max_batch=max_batch, max_gpu_deltas=max_gpu_deltas, max_cpu_deltas=max_cpu_deltas, max_queue=max_queue, prefill_chunk=prefill_chunk, device=device, dtype=dtype, cuda_graphs=cuda_graphs,
                          base_quant=base_quant, tensor_parallel=tensor_parallel)
    on_ray = replicas is not None or min_replicas is not None or max_replicas is not None or ray_address is not None
    if not on_ray:
        run_server(base, deltas, _parse_deltas(delta), host, port, config, api_key, admin_key, max_body_mb, log_level)
        return
    if deltas is None or delta:
        raise BitDeltaError("on Ray Serve every replica reads one shared --deltas folder; --delta NAME=PATH is for a single server")
    logging.config.dictConfig(logging_config(log_level))
    from bitdelta.ray import RayServeConfig
    from bitdelta.ray.launch import run_on_ray

    run_on_ray(RayServeConfig(base, str(deltas), config, replicas or 1, min_replicas, max_replicas, target_ongoing_requests,
                              api_key=api_key, admin_key=admin_key, max_body_mb=max_body_mb), host, port, ray_address)


def main() -> None:
    """`python -m bitdelta.server`: one line per user error, as `bitdelta` does."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        typer.run(serve)
    except BitDeltaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
