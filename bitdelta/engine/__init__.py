"""The multi-tenant engine: one base model, many 1-bit fine-tunes, rows of all of them in every batch.

    engine = Engine(base_dir, EngineConfig(max_batch=64))
    engine.store.register("vicuna", "deltas/vicuna")
    engine.generate([("vicuna", prompt_ids, SamplingParams(max_tokens=64, temperature=0))])

`bitdelta.server` puts an OpenAI-compatible HTTP API in front of it.
"""

from .engine import Engine, EngineConfig, EngineObserver, Output
from bitdelta.errors import InvalidRequestError, QueueFullError, UnknownModelError
from .sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineObserver", "InvalidRequestError", "Output", "QueueFullError", "SamplingParams", "UnknownModelError"]
