"""bitdelta on Ray Serve: many engine replicas (one GPU each) behind one OpenAI endpoint, each
fine-tune's requests routed to replicas that already hold its delta (Serve's model multiplexing).

    serve run bitdelta.ray:app base=BASE deltas=DIR [replicas=2] [min_replicas=1 max_replicas=8] ...
    bitdelta serve BASE --deltas DIR --replicas 2          # the same, on a local Ray cluster

`app` is the application builder those commands call; `build_app(RayServeConfig(...))` is the same
from Python. Ray is an optional extra: `pip install bitdelta[ray]`.
"""

from __future__ import annotations

try:
    import ray  # noqa: F401 -- imported first so a missing extra fails with a clear message
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from bitdelta.errors import BitDeltaError

    raise BitDeltaError("Ray Serve is not installed; install the extra: pip install 'bitdelta[ray]'") from error

from .app import RayServeConfig, app, build_app

__all__ = ["RayServeConfig", "app", "build_app"]
