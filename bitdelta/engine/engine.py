"""The multi-tenant engine: a scheduler loop doing continuous batching over one base model.

Every step packs into one forward pass: one token for each running sequence that is decoding,
plus chunks of the prompts of newly admitted sequences (at most `prefill_chunk` prompt tokens a
step, so a long prompt delays the decoders by one bounded step instead of a whole prefill). Rows of
different fine-tunes share the pass; each row computes with its own delta (MultiTenantModel).
Sequences join as soon as their delta is in a slot and the KV cache can hold them, and leave at
the step they finish, are cancelled, or their client goes away.

`submit` and `cancel` are safe from any thread; `step` runs in one thread (the loop started by
`start`, or a caller driving it directly, as the tests and the demo do).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitdelta.device import resolve_device
from bitdelta.errors import BitDeltaError, InvalidRequestError, QueueFullError

from .graphs import DecodeGraphs
from .kvcache import BlockTable, PagedKVCache
from .model import MultiTenantModel, StepBatch
from .sampling import SamplingParams, TextStream, sample
from .store import DeltaEntry, DeltaStore

log = logging.getLogger("bitdelta.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 64  # sequences in the running batch
    max_gpu_deltas: int = 32  # delta slots in the model (the GPU tier)
    max_cpu_deltas: int = 256  # verified deltas kept in (pinned) CPU memory
    max_queue: int = 1024  # requests waiting to join the batch; more are refused
    # prompt tokens per step, shared by the prefilling sequences. Steps with prefill run eagerly and
    # cost 100-170 ms of launches on a 7B model whatever the chunk up to 2048 tokens (H100,
    # benchmarks/chunked_prefill.py): larger chunks cut time to first token 4.5-8x for about the
    # same pause of the decoders, and reach the merged-weight GEMM's 512 rows a delta (1024 when the
    # rows of more than two deltas must be gathered)
    prefill_chunk: int = 2048
    kv_block_size: int = 16
    kv_blocks: int | None = None  # None: enough for max_batch sequences at full context
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs on a GPU (graphs.py)
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: float32 on a CPU, the base's dtype on a GPU


@dataclass(frozen=True)
class Output:
    """One event of a request: new text, and at the end the reason and the usage."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def step(self, sequences: int, deltas: int, prefill_tokens: int, decode_tokens: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, model: str, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...


@dataclass(eq=False)
class Sequence:
    id: int
    entry: DeltaEntry
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    stream: TextStream
    generator: torch.Generator | None
    arrived: float = field(default_factory=time.perf_counter)
    slot: int | None = None
    kv: BlockTable | None = None
    computed: int = 0  # positions whose keys/values are in the cache
    last_token_at: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.stream.token_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class Engine:
    def __init__(self, base: str | Path, config: EngineConfig = EngineConfig(), observer: EngineObserver | None = None, base_name: str | None = None):
        from transformers import AutoModelForCausalLM

        from bitdelta.checkpoint import Checkpoint

        checkpoint = Checkpoint(base)
        device = resolve_device(config.device)
        hf_model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=_dtype(config.dtype, device, checkpoint.path))
        self._setup(hf_model.to(device), config, observer, base_name or _served_name(base), checkpoint.path, checkpoint.fingerprint)

    @classmethod
    def from_model(cls, model: nn.Module, config: EngineConfig = EngineConfig(), observer: EngineObserver | None = None, name: str = "base") -> Engine:
        """An engine over a transformers model already in memory, on its device and in its dtype
        (`config.device` and `config.dtype` are not used). It has no tokenizer: requests are token
        ids and outputs carry no text. Deltas come in through `engine.store.add`."""
        engine = cls.__new__(cls)
        engine._setup(model, config, observer, name, None, "in-memory")
        return engine

    def _setup(self, hf_model: nn.Module, config: EngineConfig, observer: EngineObserver | None, base_name: str, base_dir: Path | None, fingerprint: str) -> None:
        self.config, self.observer = config, observer or EngineObserver()
        self.model = MultiTenantModel(hf_model.eval(), config.max_gpu_deltas)
        self.context = self.model.context
        blocks = config.kv_blocks or config.max_batch * -(-self.context // config.kv_block_size)
        self.kv = PagedKVCache(len(self.model.layers), self.model.kv_heads, self.model.head_dim, blocks, config.kv_block_size, self.model.dtype, self.model.device)
        self.graphs = DecodeGraphs(self.model, self.kv, config.max_batch) if config.cuda_graphs and self.model.device.type == "cuda" else None
        self._wakeup = threading.Condition()
        self.store = DeltaStore(self.model, base_name, base_dir, fingerprint, config.max_cpu_deltas, self._notify)
        self._inbox: deque[Sequence] = deque()
        self._cancelled: set[int] = set()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, model: str, prompt: list[int], params: SamplingParams, emit: Callable[[Output], None]) -> int:
        """Queue a request; `emit` is called (from the engine thread) with each Output. Returns its id."""
        entry = self.store.get(model)
        self._check(prompt, params, entry)
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        sequence = Sequence(next(self._ids), entry, list(prompt), params, emit, TextStream(entry.tokenizer, params.stop), generator)
        with self._wakeup:
            if len(self._inbox) + len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"the server has {self.config.max_queue} requests waiting (--max-queue); retry later")
            self._inbox.append(sequence)
            self._wakeup.notify()
        return sequence.id

    def cancel(self, request_id: int) -> None:
        with self._wakeup:
            self._cancelled.add(request_id)
            self._wakeup.notify()

    def _check(self, prompt: list[int], params: SamplingParams, entry: DeltaEntry) -> None:
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model.base_shape(self.model.embed_name)[0]
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt) + params.max_tokens > self.context:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.context} tokens; the prompt has {len(prompt)} and max_tokens asks for {params.max_tokens}"
            )

    def stats(self) -> dict[str, int]:
        with self._wakeup:
            waiting, running = len(self._inbox) + len(self._waiting), len(self._running)
        tokens = sum(s.computed for s in list(self._running))
        return {"waiting": waiting, "running": running, "kv_blocks_used": self.kv.blocks_used, "kv_blocks_total": self.kv.num_blocks,
                "kv_tokens": tokens, "kv_block_size": self.kv.block_size, **{f"deltas_{k}": v for k, v in self.store.resident().items()}}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bitdelta-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
        self.store.close()

    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._inbox and not self._cancelled and not self._runnable():
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug must not kill the server: fail the batch, keep serving
                log.exception("engine step failed; failing the running requests")
                for sequence in self._running + self._waiting:
                    self._finish(sequence, "error", error="internal error in the engine step")

    def _runnable(self) -> bool:
        """Whether a step can make progress (otherwise the loop sleeps until notified)."""
        return bool(self._running) or any(s.entry.loading is None for s in self._waiting)

    # ---- the engine thread --------------------------------------------------------------------
    def has_work(self) -> bool:
        with self._wakeup:
            return bool(self._inbox or self._waiting or self._running)

    def step(self) -> None:
        """Admit what can join, run one packed forward pass, emit the new tokens."""
        with self._wakeup:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancelled, self._cancelled = self._cancelled, set()
        for sequence in [s for s in self._running + self._waiting if s.id in cancelled]:
            self._finish(sequence, "cancelled")
        self._admit()
        batch, sequences = self._build_batch()
        if batch is None:
            return
        logits = self.model.forward(batch, self.kv) if self.graphs is None else self.graphs.forward(batch)
        self._advance(sequences, logits)

    def _admit(self) -> None:
        for sequence in list(self._waiting):
            if len(self._running) >= self.config.max_batch:
                return
            if not self.kv.can_reserve(len(sequence.prompt) + sequence.params.max_tokens):
                return  # first come, first served: later requests do not overtake on KV space
            try:
                slot = self.store.acquire(sequence.entry)
            except BitDeltaError as error:
                self._finish(sequence, "error", error=str(error))
                continue
            if slot is None:
                continue  # its delta is loading (or all slots are busy); the others go ahead
            sequence.slot = slot
            sequence.kv = self.kv.reserve(len(sequence.prompt) + sequence.params.max_tokens)
            self._waiting.remove(sequence)
            self._running.append(sequence)

    def _build_batch(self) -> tuple[StepBatch | None, list[Sequence]]:
        ids, positions, slots, row_sequence, tables, write_rows, logit_rows, sequences = [], [], [], [], [], [], [], []
        budget = prefill_tokens = self.config.prefill_chunk
        for sequence in sorted(self._running, key=lambda s: s.prefilling):  # decoders first
            tokens = sequence.tokens
            if sequence.prefilling:
                if budget == 0:
                    continue
                count = min(budget, len(sequence.prompt) - sequence.computed)
                budget -= count
            else:
                count = len(tokens) - sequence.computed  # the token sampled last step
            start, end = sequence.computed, sequence.computed + count
            self.kv.grow(sequence.kv, end)
            row = len(ids)
            ids += tokens[start:end]
            positions += range(start, end)
            slots += [sequence.slot] * count
            row_sequence += [len(tables)] * count
            write_rows += self.kv.rows(sequence.kv, start, end)
            tables.append(sequence.kv.blocks)
            sequence.computed = end
            if end == len(tokens):  # the whole known sequence is cached: sample its next token
                logit_rows.append(row + count - 1)
                sequences.append(sequence)
        if not tables:
            return None, []
        prefilled = prefill_tokens - budget
        self.observer.step(len(tables), len(set(slots) - {-1}), prefilled, len(ids) - prefilled)
        width = max(len(blocks) for blocks in tables)
        batch = StepBatch(
            torch.tensor(ids), torch.tensor(positions), torch.tensor(slots, dtype=torch.int32),
            torch.tensor(row_sequence, dtype=torch.int32), torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in tables], dtype=torch.int32),
            torch.tensor(write_rows), torch.tensor(logit_rows, dtype=torch.long),
        )
        return batch, sequences

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        greedy = torch.argmax(logits, dim=-1).tolist()  # one host sync for every greedy row
        now = time.perf_counter()
        for sequence, row, best in zip(sequences, logits, greedy):
            params = sequence.params
            token = best if params.temperature == 0 else sample(row, params, sequence.generator)
            first = not sequence.stream.token_ids
            self.observer.first_token(now - sequence.arrived) if first else self.observer.next_token(now - sequence.last_token_at)
            sequence.last_token_at = now
            if token in sequence.entry.eos_ids:
                sequence.stream.token_ids.append(token)
                self._finish(sequence, "stop")
                continue
            stopped = sequence.stream.add(token)
            if stopped:
                self._finish(sequence, "stop")
            elif len(sequence.stream.token_ids) >= params.max_tokens or len(sequence.tokens) >= self.context:
                self._finish(sequence, "length")
            else:
                piece = sequence.stream.release(final=False)
                sequence.emit(Output(piece, [token]))

    def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
        if sequence in self._running:
            self._running.remove(sequence)
            self.kv.release(sequence.kv)
            self.store.release(sequence.entry)
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        else:
            return
        generated = sequence.stream.token_ids
        self.observer.finished(sequence.entry.name, reason, len(sequence.prompt), len(generated))
        text = sequence.stream.release(final=True) if reason in ("stop", "length") else ""
        sequence.emit(Output(text, generated[-1:] if reason in ("stop", "length") else [], reason, len(sequence.prompt), len(generated), error))

    def generate(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[list[Output]]:
        """Run `requests` to completion on this thread (no loop thread): for tests and the demo."""
        outputs: list[list[Output]] = [[] for _ in requests]
        for index, (model, prompt, params) in enumerate(requests):
            self.submit(model, prompt, params, outputs[index].append)
        while self.has_work():
            with self._wakeup:
                if not self._inbox and not self._cancelled and not self._runnable():
                    self._wakeup.wait(0.01)  # a delta is loading in the worker thread
            self.step()
        return outputs


def _dtype(name: str, device: torch.device, base_dir: Path) -> torch.dtype:
    from bitdelta.apply import DTYPES

    if name != "auto":
        if name not in DTYPES:
            raise BitDeltaError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and the reference path is fp32 anyway
    from transformers import AutoConfig

    own = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None)
    return own if own in (torch.float16, torch.bfloat16) else torch.bfloat16


def _served_name(base: str | Path) -> str:
    """A local base is served under its folder name, a hub base under its id."""
    path = Path(base)
    return path.name if path.is_dir() else str(base)
