"""`bitdelta serve BASE --deltas DIR --replicas N`: the Ray Serve application on a Ray cluster (a
local one started here when no address is given), serving until interrupted."""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from bitdelta.display import count

from .app import RayServeConfig, build_app

log = logging.getLogger("bitdelta.ray")
APP_NAME = "bitdelta"


def run_on_ray(config: RayServeConfig, host: str, port: int, address: str | None = None) -> None:
    """Deploy `config` as the application "bitdelta" at http://host:port and block until SIGINT
    or SIGTERM; a cluster started here stops with it, a given cluster keeps running."""
    ray.init(address=address, include_dashboard=False)
    # after ray.init, which installs Ray's crash handler on SIGTERM (a stack dump and an abort):
    # SIGTERM now interrupts like Ctrl-C, even during the deployment, and the app stops cleanly
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        replicas = count(config.replicas, "engine replica") if config.min_replicas is None else f"{config.min_replicas}-{config.max_replicas} engine replicas"
        log.info("serving on http://%s:%d/v1 with %s (Ray Serve)", host, port, replicas)
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
