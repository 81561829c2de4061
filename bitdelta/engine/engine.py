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
import torch.distributed as dist
from torch import nn

from bitdelta.device import DTYPES, resolve_device
from bitdelta.errors import BitDeltaError, EngineFailedError, InvalidRequestError, QueueFullError
from bitdelta.quant import quantized_fingerprint

from .config import EngineConfig
from .graphs import DecodeGraphs
from .kvcache import BlockTable, PagedKVCache
from .model import MultiTenantModel, StepBatch, check_model_type
from .parallel import Leader, TensorParallel, abort_ranks, check_split, follow, load_share, start_ranks, stop_ranks
from .sampling import SamplingParams, TextStream, is_greedy, sample
from .store import DeltaEntry, DeltaStore, read_weights

log = logging.getLogger("bitdelta.engine")


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
    """A hook on every forward pass, for metrics (request-level metrics are the caller's: they follow
    from the Output events); the default does nothing."""

    def step(self, sequences: int, deltas: int, prefill_tokens: int, decode_tokens: int) -> None: ...


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

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.stream.token_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


@dataclass(frozen=True)
class Chunk:
    """A sequence's rows in one step: positions [start, end)."""

    sequence: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """The whole known sequence is cached after this step: its next token is sampled."""
        return self.end == len(self.sequence.tokens)


class Engine:
    def __init__(self, base: str | Path, config: EngineConfig = EngineConfig(), observer: EngineObserver | None = None, base_name: str | None = None):
        from transformers import AutoModelForCausalLM

        from bitdelta.checkpoint import Checkpoint

        checkpoint = Checkpoint(base)
        device = resolve_device(config.device)
        # Engine(base, EngineConfig(tensor_parallel=N)) starts ranks 1..N-1 itself; in one of those ranks the group exists already
        self._ranks = []
        if config.tensor_parallel > 1:
            check_model_type(checkpoint.config.get("model_type"))  # what can be refused is refused before any process starts
            check_split(checkpoint.config, config.tensor_parallel, config.base_quant)
            if not dist.is_initialized():
                self._ranks = start_ranks(str(checkpoint.path), config)
        try:
            tp = TensorParallel.current(config.tensor_parallel) if config.tensor_parallel > 1 else None
            if tp is not None and device.type == "cuda":
                device = torch.device("cuda", tp.rank)  # one GPU a rank
            # checkpoint.path is a local folder (a hub id was resolved by Checkpoint): nothing reaches the network from here on
            dtype = _dtype(config.dtype, device, checkpoint.path)
            # a quantized base is quantized from the checkpoint's own values, as compress quantizes them,
            # and the rest cast to the serving dtype after: rounding first would give other codes
            load_dtype = _own_dtype(checkpoint) if config.base_quant else dtype
            if tp is not None:  # this rank's share alone, read from the files
                hf_model = load_share(checkpoint, tp, load_dtype)
            else:
                hf_model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=load_dtype, local_files_only=True)
            self._setup(hf_model, config, observer, base_name or _served_name(base), checkpoint.path, checkpoint.fingerprint,
                        dtype, device)
        except BaseException:
            if self._ranks:  # the other ranks cannot go on without this one
                abort_ranks(self._ranks)
            raise

    @classmethod
    def from_model(cls, model: nn.Module, config: EngineConfig = EngineConfig(), observer: EngineObserver | None = None, name: str = "base") -> Engine:
        """An engine over a transformers model already in memory, on its device and in its dtype
        (`config.device` and `config.dtype` are not used). It has no tokenizer: requests are token
        ids and outputs carry no text. Deltas come in through `engine.store.add`."""
        engine = cls.__new__(cls)
        engine._ranks = []
        engine._setup(model, config, observer, name, None, "in-memory")
        return engine

    def _setup(self, hf_model: nn.Module, config: EngineConfig, observer: EngineObserver | None, base_name: str, base_dir: Path | None, fingerprint: str,
               dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        self.config, self.observer = config, observer or EngineObserver()
        tp = TensorParallel.current(config.tensor_parallel) if config.tensor_parallel > 1 else None
        self.model = MultiTenantModel(hf_model.eval(), config.max_gpu_deltas, config.base_quant, tp, dtype, device)
        base_quant = None if config.base_quant is None else {
            "recipe": config.base_quant, "fingerprint": quantized_fingerprint(fingerprint, config.base_quant, self.model.quantized_names(base_dir))}
        self.context = self.model.context
        blocks = config.kv_blocks or config.max_batch * -(-self.context // config.kv_block_size)
        self.kv = PagedKVCache(len(self.model.layers), self.model.kv_heads, self.model.head_dim, blocks, config.kv_block_size, self.model.dtype, self.model.device)
        self.graphs = (DecodeGraphs(self.model, self.kv, config.max_batch)
                       if config.cuda_graphs and self.model.device.type == "cuda" and self.model.graphable and tp is None else None)
        if tp is not None and tp.rank == 0:
            self.model = Leader(self.model, self._ranks)  # every step and install broadcast to the other ranks first
        self._wakeup = threading.Condition()
        self.failure: EngineFailedError | None = None  # set once the engine can serve nothing more
        self.store = DeltaStore(self.model, base_name, base_dir, fingerprint, config.max_cpu_deltas, self._notify, base_quant)
        self._inbox: deque[Sequence] = deque()
        self._cancelled: set[int] = set()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._draining: tuple[Sequence, int] | None = None  # (oldest request finding every slot busy, the slot emptying for it)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, model: str, prompt: list[int], params: SamplingParams, emit: Callable[[Output], None]) -> int:
        """Queue a request; `emit` is called (from the engine thread) with each Output. Returns its id."""
        if self.failure is not None:
            raise EngineFailedError(str(self.failure))
        entry = self.store.get(model)
        self._check(prompt, params, entry)
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        sequence = Sequence(next(self._ids), entry, list(prompt), params, emit, TextStream(entry.tokenizer, params.stop), generator)
        with self._wakeup:
            if self.failure is not None:  # failed since the check above: `_fail` has emptied the inbox for good
                raise EngineFailedError(str(self.failure))
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
                "kv_tokens": tokens, "kv_block_size": self.kv.block_size, "delta_loads": self.store.loads,
                **{f"deltas_{k}": v for k, v in self.store.resident().items()}}

    @property
    def running(self) -> bool:
        """Its scheduler thread is alive (started and not stopped or crashed)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bitdelta-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
        if isinstance(self.model, Leader):
            self.model.stop()
            if self._ranks:
                (abort_ranks if self.model.failed else stop_ranks)(self._ranks)
        self.store.close()

    def follow(self) -> None:
        """A tensor-parallel rank other than 0: compute the steps rank 0's engine broadcasts, until it stops."""
        follow(self.model, self.kv, lambda path: read_weights(path, self.model, self.store.base_fingerprint, self.store.base_quant))

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
            except Exception:  # a bug outside any one request's work: keep the server alive
                log.exception("engine step failed; failing the running requests")
                for sequence in self._running + self._waiting:
                    self._finish(sequence, "error", error="internal error in the engine step")
            if self.failure is not None:  # nothing can be served any more: the thread ends (`running` is False)
                return

    def _fail(self, error: EngineFailedError) -> None:
        """Fail every request, now and later, with `error`; the engine thread then ends (`running` is
        False, so /health answers 503 and a supervisor restarts the server)."""
        log.error("%s", error)
        with self._wakeup:
            self.failure = error
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        for sequence in self._running + self._waiting:
            self._finish(sequence, "error", error=str(error))

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
        chunks = self._schedule()
        if chunks:
            self._run(chunks)

    def _admit(self) -> None:
        """Move waiting requests into the batch, oldest first. When the oldest request that needs a
        slot finds every slot busy, one slot (the least busy) takes no new users until it drains and
        passes to that request: requests for deltas already in a slot cannot starve the others."""
        if self._draining is not None and self._draining[0] not in self._waiting:
            self._draining = None
        for sequence in list(self._waiting):
            if len(self._running) >= self.config.max_batch:
                return
            if not self.kv.can_reserve(len(sequence.prompt) + sequence.params.max_tokens):
                return  # first come, first served: later requests do not overtake on KV space
            if self._draining is not None and sequence.entry.slot == self._draining[1] and sequence is not self._draining[0]:
                continue
            try:
                slot = self.store.acquire(sequence.entry, sequence.arrived)
            except Exception as error:  # noqa: BLE001 -- a delta that cannot be loaded fails its own requests only
                if not isinstance(error, BitDeltaError):
                    log.exception("request %d: its delta %r could not be put in a slot", sequence.id, sequence.entry.name)
                self._finish(sequence, "error", error=str(error) if isinstance(error, BitDeltaError) else "internal error while loading the delta")
                continue
            if slot is None:  # its delta is loading, or every slot is busy; the others go ahead
                if self._draining is None and self.store.waits_for_slot(sequence.entry):
                    drain = self.store.least_busy_slot()
                    self._draining = None if drain is None else (sequence, drain)
                continue
            if self._draining is not None and self._draining[0] is sequence:
                self._draining = None
            sequence.slot = slot
            sequence.kv = self.kv.reserve(len(sequence.prompt) + sequence.params.max_tokens)
            self._waiting.remove(sequence)
            self._running.append(sequence)

    def _schedule(self) -> list[Chunk]:
        """This step's rows: one token of every decoding sequence, then prompt chunks within budget."""
        chunks, budget = [], self.config.prefill_chunk
        for sequence in sorted(self._running, key=lambda s: s.prefilling):  # decoders first
            if sequence.prefilling:
                if budget == 0:
                    continue
                count = min(budget, len(sequence.prompt) - sequence.computed)
                budget -= count
            else:
                count = len(sequence.tokens) - sequence.computed  # the token sampled last step
            chunks.append(Chunk(sequence, sequence.computed, sequence.computed + count))
        return chunks

    def _run(self, chunks: list[Chunk]) -> None:
        """One forward pass over `chunks`. If it raises, each sequence runs alone, so the failure
        ends only the request(s) whose own pass fails: one tenant never fails another's step."""
        try:
            batch = self._build_batch(chunks)
            logits = self.model.forward(batch, self.kv) if self.graphs is None else self.graphs.forward(batch)
        except EngineFailedError as error:  # not one request's failure: every request's
            self._fail(error)
            return
        except Exception:
            if len(chunks) > 1:
                log.warning("a step of %d sequences failed; running each alone to find the cause", len(chunks), exc_info=True)
                for chunk in chunks:
                    if self.failure is not None:  # `_fail` ended every request
                        return
                    self._run([chunk])
            else:
                log.exception("request %d (%s) failed in its forward pass", chunks[0].sequence.id, chunks[0].sequence.entry.name)
                self._finish(chunks[0].sequence, "error", error="internal error in the forward pass")
            return
        prefilled = sum(c.end - c.start for c in chunks if c.start < len(c.sequence.prompt))
        self.observer.step(len(chunks), len({c.sequence.slot for c in chunks} - {-1}), prefilled, len(batch.token_ids) - prefilled)
        for chunk in chunks:
            chunk.sequence.computed = chunk.end
        self._advance([c.sequence for c in chunks if c.samples], logits)

    def _build_batch(self, chunks: list[Chunk]) -> StepBatch:
        ids, positions, slots, row_sequence, write_rows, logit_rows = [], [], [], [], [], []
        for index, chunk in enumerate(chunks):
            sequence, count = chunk.sequence, chunk.end - chunk.start
            self.kv.grow(sequence.kv, chunk.end)
            ids += sequence.tokens[chunk.start:chunk.end]
            positions += range(chunk.start, chunk.end)
            slots += [sequence.slot] * count
            row_sequence += [index] * count
            write_rows += self.kv.rows(sequence.kv, chunk.start, chunk.end)
            if chunk.samples:
                logit_rows.append(len(ids) - 1)
        tables = [chunk.sequence.kv.blocks for chunk in chunks]
        width = max(len(blocks) for blocks in tables)
        return StepBatch(
            torch.tensor(ids), torch.tensor(positions), torch.tensor(slots, dtype=torch.int32),
            torch.tensor(row_sequence, dtype=torch.int32), torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in tables], dtype=torch.int32),
            torch.tensor(write_rows), torch.tensor(logit_rows, dtype=torch.long),
        )

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        greedy = torch.argmax(logits, dim=-1).tolist()  # one host sync for every greedy row
        for sequence, row, best in zip(sequences, logits, greedy):
            try:
                token = best if is_greedy(sequence.params) else sample(row, sequence.params, sequence.generator)
                self._take(sequence, token)
            except Exception:  # noqa: BLE001 -- a request's own failure ends that request alone
                log.exception("request %d (%s) failed while taking its next token", sequence.id, sequence.entry.name)
                self._finish(sequence, "error", error="internal error while sampling")

    def _take(self, sequence: Sequence, token: int) -> None:
        if token in sequence.entry.eos_ids and not sequence.params.ignore_eos:
            sequence.stream.token_ids.append(token)
            self._finish(sequence, "stop")
        elif sequence.stream.add(token):
            self._finish(sequence, "stop")
        elif len(sequence.stream.token_ids) >= sequence.params.max_tokens or len(sequence.tokens) >= self.context:
            self._finish(sequence, "length")
        else:
            self._emit(sequence, Output(sequence.stream.release(final=False), [token]))

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
        text = sequence.stream.release(final=True) if reason in ("stop", "length") else ""
        self._emit(sequence, Output(text, generated[-1:] if reason in ("stop", "length") else [], reason, len(sequence.prompt), len(generated), error))

    def _emit(self, sequence: Sequence, output: Output) -> None:
        try:
            sequence.emit(output)
        except Exception:  # noqa: BLE001 -- e.g. its client's event loop has closed: end that request only
            log.exception("request %d: its listener failed; cancelling it", sequence.id)
            self.cancel(sequence.id)

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
    if name != "auto":
        if name not in DTYPES:
            raise BitDeltaError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and the reference path is fp32 anyway
    from transformers import AutoConfig

    own = getattr(AutoConfig.from_pretrained(base_dir, local_files_only=True), "dtype", None)
    return own if own in (torch.float16, torch.bfloat16) else torch.bfloat16


def _own_dtype(checkpoint) -> torch.dtype:
    """The dtype most of the checkpoint's bytes are stored in."""
    stored: dict[torch.dtype, int] = {}
    for meta in checkpoint.tensors.values():
        if meta.dtype.is_floating_point:
            stored[meta.dtype] = stored.get(meta.dtype, 0) + meta.nbytes
    return max(stored, key=stored.get, default=torch.float32)


def _served_name(base: str | Path) -> str:
    """A local base is served under its folder name, a hub base under its id."""
    path = Path(base)
    return path.name if path.is_dir() else str(base)
