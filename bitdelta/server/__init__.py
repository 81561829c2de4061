"""OpenAI-compatible server over the multi-tenant engine: `bitdelta serve BASE --deltas DIR`.

    from bitdelta.server import run_server
    run_server("base-model", deltas_dir="deltas/", port=8000)
"""

from .app import ServerSettings, create_app
from .cli import run_server, serve

__all__ = ["ServerSettings", "create_app", "run_server", "serve"]
