"""The multi-tenant engine: one base model, many 1-bit fine-tunes, rows of all of them in every batch.

    engine = Engine(base_dir, EngineConfig(max_batch=64))
    engine.store.register("vicuna", "deltas/vicuna")
    engine.generate([("vicuna", prompt_ids, SamplingParams(max_tokens=64, temperature=0))])

`bitdelta.server` puts an OpenAI-compatible HTTP API in front of it. The names that need torch load
on first use, so importing the package for `EngineConfig` (the serve command's defaults) is free.
"""

from bitdelta.errors import EngineFailedError, InvalidRequestError, QueueFullError, UnknownModelError

from .config import EngineConfig

__all__ = ["Engine", "EngineConfig", "EngineFailedError", "EngineObserver", "InvalidRequestError", "Output", "QueueFullError", "SamplingParams", "UnknownModelError"]
_LAZY = {"Engine": ".engine", "EngineObserver": ".engine", "Output": ".engine", "SamplingParams": ".sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
