"""Prometheus metrics of one server. Request metrics (finished requests, tokens, time to first token,
inter-token latency, refusals) are observed by the HTTP layer, so every backend has them; engine
metrics (batch composition, queue, KV cache, deltas per tier) come from the engine in this process
through its observer hooks and `stats()` when scraped. A registry per server (not the global one),
so several servers can live in one process (the tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bitdelta.engine import Engine, EngineObserver

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics(EngineObserver):
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("bitdelta_requests", "Finished requests by model and finish reason (stop, length, cancelled, error).", ["model", "finish_reason"], registry=registry)
        self.rejected = Counter("bitdelta_rejected_requests", "Requests refused before reaching the engine, by HTTP status.", ["status"], registry=registry)
        self.prompt_tokens = Counter("bitdelta_prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=registry)
        self.generation_tokens = Counter("bitdelta_generation_tokens", "Generated tokens of finished requests.", ["model"], registry=registry)
        self.ttft = Histogram("bitdelta_time_to_first_token_seconds", "From arrival to the first generated token.", buckets=_LATENCY, registry=registry)
        self.itl = Histogram("bitdelta_inter_token_latency_seconds", "Between consecutive tokens of a request.", buckets=_LATENCY, registry=registry)
        self.batch_size = Histogram("bitdelta_batch_size", "Sequences per forward pass.", buckets=_SIZES, registry=registry)
        self.batch_deltas = Histogram("bitdelta_batch_deltas", "Distinct fine-tunes per forward pass.", buckets=_SIZES, registry=registry)
        self.step_tokens = Counter("bitdelta_step_tokens", "Tokens run through the model, by phase.", ["phase"], registry=registry)

    def bind(self, engine: Engine) -> None:
        """Gauges read from `engine` when scraped; the engine's steps observed through `self`."""
        registry = self.registry
        read = lambda key: lambda: engine.stats()[key]  # noqa: E731
        Gauge("bitdelta_queue_depth", "Requests waiting to join the batch.", registry=registry).set_function(read("waiting"))
        Gauge("bitdelta_running_requests", "Sequences in the running batch.", registry=registry).set_function(read("running"))
        resident = Gauge("bitdelta_deltas_resident", "Deltas per tier: gpu slots, cpu memory, disk (registered).", ["tier"], registry=registry)
        for tier in ("gpu", "cpu", "disk"):
            resident.labels(tier=tier).set_function(read(f"deltas_{tier}"))
        blocks = Gauge("bitdelta_kv_cache_blocks", "Paged KV cache blocks, used and total.", ["state"], registry=registry)
        blocks.labels(state="used").set_function(read("kv_blocks_used"))
        blocks.labels(state="total").set_function(read("kv_blocks_total"))
        Gauge("bitdelta_delta_loads", "Deltas read from disk and verified since start (a count that only grows).",
              registry=registry).set_function(read("delta_loads"))
        Gauge("bitdelta_kv_cache_tokens", "Tokens held in the KV cache (blocks_used * block_size - tokens = padding waste).",
              registry=registry).set_function(read("kv_tokens"))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- the HTTP layer, per request ----
    def token(self, first: bool, seconds: float) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def request_finished(self, model: str, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(model=model, finish_reason=reason).inc()
        self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        self.generation_tokens.labels(model=model).inc(completion_tokens)

    # ---- EngineObserver (called from the engine thread) ----
    def step(self, sequences: int, deltas: int, prefill_tokens: int, decode_tokens: int) -> None:
        self.batch_size.observe(sequences)
        self.batch_deltas.observe(deltas)
        self.step_tokens.labels(phase="prefill").inc(prefill_tokens)
        self.step_tokens.labels(phase="decode").inc(decode_tokens)
