"""OpenAI-compatible server over the multi-tenant engine: `bitdelta serve BASE --deltas DIR`.

    from bitdelta.server import run_server
    run_server("base-model", deltas_dir="deltas/", port=8000)

Names load on first use, so the command's help needs neither torch nor FastAPI.
"""

__all__ = ["ServerSettings", "create_app", "run_server", "serve"]
_LAZY = {"ServerSettings": ".settings", "create_app": ".app", "run_server": ".cli", "serve": ".cli"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
