"""DeltaStore: the deltas an engine serves, in three tiers.

    disk   every registered delta (a folder in the deltas directory, or given by path)
    CPU    up to max_cpu_deltas read and validated deltas (pinned memory when CUDA is present,
           so the copy into a GPU slot is a fast asynchronous DMA)
    GPU    max_gpu_deltas slots inside the model (MultiTenantModel.install); on a CPU-only host
           the slots are simply tensors on the CPU

Both caches evict the least recently used entry; a slot used by a running sequence is never
evicted. Reading from disk runs in a worker thread, so a request for a cold delta waits only for
its own load while the batch keeps decoding. A delta is checked against the base (fingerprint,
architecture, every tensor name and shape) before it is registered, and fully verified
(checksums) before its bits reach a slot: a bad file is an error for its caller only. A failed load
fails the requests that were waiting for it; the next request tries again, so a fixed file serves
without an unload and reload. Errors given to clients name the delta, never a server path (the log
has the full message).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from bitdelta.errors import BitDeltaError, DeltaFormatError, IncompatibleModelsError, UnknownModelError
from bitdelta.fileformat import DeltaConfig, DeltaReader, check_base_identity
from bitdelta.pack import packed_words

from .model import MultiTenantModel, SlotWeights

log = logging.getLogger("bitdelta.engine")


@dataclass(eq=False)
class DeltaEntry:
    """A served model: the base (slot -1) or one delta, read from `path` or given in memory (`path` None)."""

    name: str
    path: Path | None
    tokenizer_dir: Path | None  # None: a model without a tokenizer (token ids in, token ids out)
    weights: SlotWeights | None = None  # CPU tier
    loading: Future | None = None
    load_error: BitDeltaError | None = None  # the last load's failure, for requests older than it
    load_failed_at: float = 0.0  # time.perf_counter() of that failure
    slot: int | None = None  # GPU tier
    users: int = 0  # running sequences reading its slot
    registered: bool = True
    is_base: bool = False
    base: DeltaEntry | None = None  # the served base's entry (None for the base itself)

    @cached_property
    def tokenizer(self):
        """Loaded on first use; a failure is not cached, so a repaired folder serves at the next request."""
        if self.tokenizer_dir is None:
            return None
        try:
            return _load_tokenizer(self.tokenizer_dir)
        except BitDeltaError as error:
            log.error("model %r: %s", self.name, error)
            raise redacted(error, self.name, self.path, self.tokenizer_dir) from None

    @cached_property
    def chat_template(self) -> str | None:
        """Its tokenizer's chat template; for a fine-tune saved without one, the base's, when the two
        tokenizers have the same vocabulary (the template then renders to the same ids)."""
        own = self.tokenizer.chat_template if self.tokenizer is not None else None
        if own or self.base is None or self.base.tokenizer is None or not self.base.tokenizer.chat_template:
            return own
        return self.base.tokenizer.chat_template if self.base.tokenizer.get_vocab() == self.tokenizer.get_vocab() else None

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token covers (the longest vocabulary entry): a text of C
        characters has at least C / max_token_chars tokens, so an overlong prompt is refused before
        it is tokenized. (Only a normalizer that deletes characters could undercut it.)"""
        return max(map(len, self.tokenizer.get_vocab()), default=1)

    @cached_property
    def eos_ids(self) -> frozenset[int]:
        """What ends a generation: the generation config's eos ids (as `generate` uses), else the tokenizer's."""
        from transformers import GenerationConfig

        if self.tokenizer_dir is None:
            return frozenset()
        try:
            eos = GenerationConfig.from_pretrained(self.tokenizer_dir, local_files_only=True).eos_token_id
        except (OSError, ValueError):
            eos = None
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    # never remote code, never the hub (a missing local folder must not turn into a download);
    # chat templates render in transformers' sandboxed jinja
    if not folder.is_dir():
        raise DeltaFormatError(f"{folder}: the folder is gone (moved or deleted); restore it or unload the delta")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # a malformed tokenizer file can raise anything; it is the delta's fault
        raise DeltaFormatError(f"{folder}: its tokenizer cannot be loaded ({type(error).__name__}: {error})") from None


class DeltaStore:
    def __init__(self, model: MultiTenantModel, base_name: str, base_dir: Path | None, base_fingerprint: str, max_cpu_deltas: int, on_loaded=lambda: None,
                 base_quant: dict | None = None):
        self.model, self.base_fingerprint, self.base_quant = model, base_fingerprint, base_quant
        self.max_cpu = max_cpu_deltas
        self._lock = threading.RLock()
        # a base folder without tokenizer files (a benchmark's random model) serves token ids alone
        tokenizer_dir = base_dir if base_dir is not None and any((base_dir / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")) else None
        self._entries: dict[str, DeltaEntry] = {base_name: DeltaEntry(base_name, None, tokenizer_dir, is_base=True)}
        self._cpu: OrderedDict[int, DeltaEntry] = OrderedDict()  # id(entry) -> entry, LRU first
        self._slots: list[DeltaEntry | None] = [None] * model.max_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # slots without users, LRU first
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bitdelta-load")
        self.loads = 0  # deltas read from disk (and verified) since start
        self._on_loaded = on_loaded  # wakes the scheduler when a cold delta is ready

    # ---- registry (any thread) ----------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, name: str) -> DeltaEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UnknownModelError(f"the model {name!r} does not exist; GET /v1/models lists the served models")
        return entry

    def register(self, name: str, path: Path, load_now: bool = False) -> DeltaEntry:
        """Serve the delta at `path` under `name`, after checking it fits the base. `load_now`
        also reads and verifies its weights here (the admin API does, so a hostile file fails
        the call that brought it)."""
        path = Path(path)
        # the weight files' headers too (cheap): a truncated or incomplete delta is refused here,
        # not advertised and then failed at every request; checksums wait for the load
        _check_config(DeltaReader(path, verify=False).config, self.model, self.base_fingerprint, path, self.base_quant)
        base = self.get_base()
        entry = DeltaEntry(name, path, path if (path / "tokenizer_config.json").is_file() else base.tokenizer_dir, base=base)
        if load_now:
            entry.weights = read_weights(path, self.model, self.base_fingerprint, self.base_quant)
            self.loads += 1
            entry.tokenizer  # noqa: B018 -- a broken tokenizer is refused now, not at the first request
        self._add_entry(entry)
        return entry

    def add(self, name: str, weights: SlotWeights) -> DeltaEntry:
        """Serve a delta given in memory, in the slot layout (benchmarks serve random deltas this
        way). With no file to read it back from, it stays in CPU memory while registered, outside
        the `max_cpu_deltas` budget."""
        for weight, signs in weights.signs.items():
            shape = self.model.delta_shape(weight)
            if shape is None or signs.shape != (shape[0], packed_words(shape[1])) or weights.scales[weight].shape != (shape[0],):
                raise IncompatibleModelsError(f"delta {name!r}: {weight} is not a block linear of the served base with these shapes")
        for tensor in weights.dense:
            if not self.model.routable(tensor) or tuple(weights.dense[tensor].shape) != self.model.base_shape(tensor):
                raise IncompatibleModelsError(f"delta {name!r}: {tensor} is not a per-fine-tune tensor of the served base with this shape")
        entry = DeltaEntry(name, None, self.get_base().tokenizer_dir, weights=weights, base=self.get_base())
        self._add_entry(entry)
        return entry

    def _add_entry(self, entry: DeltaEntry) -> None:
        with self._lock:
            if entry.name in self._entries:
                raise BitDeltaError(f"a model named {entry.name!r} is already served; DELETE /v1/deltas/{entry.name} first")
            self._entries[entry.name] = entry
            if entry.weights is not None:
                self._remember(entry)

    def unregister(self, name: str) -> None:
        """Stop serving `name`. Requests already holding the entry finish normally; its slot is
        freed when the last one leaves."""
        with self._lock:
            entry = self.get(name)
            if entry.is_base:
                raise BitDeltaError("the base model cannot be unloaded")
            del self._entries[name]
            entry.registered = False
            self._cpu.pop(id(entry), None)
            if entry.slot is not None and entry.users == 0:
                self._free_slot(entry)

    def preload(self, name: str) -> None:
        """Read and verify `name`'s weights into the CPU tier now, on this thread (a Ray Serve
        replica loads a delta before its request is queued)."""
        entry = self.get(name)
        if entry.is_base or entry.weights is not None or entry.path is None:
            return
        try:
            weights = read_weights(entry.path, self.model, self.base_fingerprint, self.base_quant)
        except BitDeltaError as error:
            log.error("delta %r could not be loaded: %s", entry.name, error)
            raise redacted(error, entry.name, entry.path, entry.tokenizer_dir) from None
        with self._lock:
            self.loads += 1
            if entry.weights is None:
                entry.weights = weights
            self._remember(entry)

    def evict(self, name: str) -> None:
        """Drop `name`'s weights from memory: the CPU tier now, its slot now or when its last running
        sequence leaves. It stays registered and is read from disk again when next asked for."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.is_base or entry.path is None:
                return
            self._cpu.pop(id(entry), None)
            entry.weights = None
            if entry.slot is not None and entry.users == 0:
                self._free_slot(entry)

    def get_base(self) -> DeltaEntry:
        with self._lock:
            return next(e for e in self._entries.values() if e.is_base)

    def resident(self) -> dict[str, int]:
        with self._lock:
            in_memory = sum(e.path is None and not e.is_base for e in self._entries.values())
            return {"gpu": sum(e is not None for e in self._slots), "cpu": len(self._cpu) + in_memory, "disk": len(self._entries) - 1 - in_memory}

    # ---- tiers (scheduler thread) -------------------------------------------------------------
    def acquire(self, entry: DeltaEntry, since: float = float("inf")) -> int | None:
        """The slot `entry`'s rows use (one more user), or None while its weights are on their way
        or every slot has running users. A request that arrived at `since` (perf_counter) gets the
        load error of a load that failed after it arrived; a later request starts a new load."""
        if entry.is_base:
            return -1
        with self._lock:
            if entry.load_error is not None:
                if since <= entry.load_failed_at:
                    raise entry.load_error
                entry.load_error = None
            if entry.slot is None:
                if entry.weights is None:
                    self._start_load(entry)
                    return None
                slot = self._take_slot()
                if slot is None:
                    return None  # every slot has running users: wait for one to finish
                self.model.install(slot, entry.weights)
                self._slots[slot], entry.slot = entry, slot
            self._slot_lru.pop(entry.slot, None)
            entry.users += 1
            if entry.weights is not None:
                self._remember(entry)
            return entry.slot

    def release(self, entry: DeltaEntry) -> None:
        if entry.is_base:
            return
        with self._lock:
            entry.users -= 1
            if entry.users == 0:
                if entry.registered:
                    self._slot_lru[entry.slot] = None
                else:
                    self._free_slot(entry)

    def waits_for_slot(self, entry: DeltaEntry) -> bool:
        """Its weights are ready but every slot has running users."""
        with self._lock:
            return not entry.is_base and entry.slot is None and entry.weights is not None

    def least_busy_slot(self) -> int | None:
        """The slot with the fewest running users (the least recently used among equals): the one
        to let drain when a request finds every slot busy."""
        with self._lock:
            busy = [(e.users, slot) for slot, e in enumerate(self._slots) if e is not None and e.users > 0]
            return min(busy)[1] if busy else None

    def _take_slot(self) -> int | None:
        if None in self._slots:
            return self._slots.index(None)
        if not self._slot_lru:
            return None
        slot, _ = self._slot_lru.popitem(last=False)
        self._slots[slot].slot = None
        self._slots[slot] = None
        return slot

    def _free_slot(self, entry: DeltaEntry) -> None:
        self._slot_lru.pop(entry.slot, None)
        self._slots[entry.slot], entry.slot = None, None

    def _remember(self, entry: DeltaEntry) -> None:
        """Mark `entry` most recently used in the CPU tier, evicting the LRU beyond capacity."""
        if entry.path is None or not entry.registered:
            return  # given in memory (never evicted), or unloaded: its last requests hold it, the tier does not
        self._cpu.pop(id(entry), None)
        self._cpu[id(entry)] = entry
        while len(self._cpu) > self.max_cpu:
            _, old = self._cpu.popitem(last=False)
            old.weights = None  # back to disk only; its GPU slot, if any, stays valid

    def _start_load(self, entry: DeltaEntry) -> None:
        if entry.loading is None:
            entry.loading = self._pool.submit(read_weights, entry.path, self.model, self.base_fingerprint, self.base_quant)
            entry.loading.add_done_callback(lambda future: self._loaded(entry, future))

    def _loaded(self, entry: DeltaEntry, future: Future) -> None:
        with self._lock:
            entry.loading = None
            error = future.exception()
            if error is None:
                entry.weights = future.result()
                self.loads += 1
            else:
                if not isinstance(error, BitDeltaError):
                    error = DeltaFormatError(f"{entry.path}: cannot be loaded ({type(error).__name__}: {error})")
                log.error("delta %r could not be loaded: %s", entry.name, error)
                entry.load_error, entry.load_failed_at = redacted(error, entry.name, entry.path, entry.tokenizer_dir), time.perf_counter()
        self._on_loaded()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def redacted(error: BitDeltaError, name: str, *folders: Path | None) -> BitDeltaError:
    """The error as a client may see it: each of `folders` (however spelled) named by `name`."""
    message = str(error)
    for folder in folders:
        if folder is not None:
            for spelling in sorted({str(folder.resolve()), str(folder), str(folder.absolute())}, key=len, reverse=True):
                message = message.replace(spelling, name)
    return type(error)(message)


def check_base(config: DeltaConfig, base_fingerprint: str, model_type: str, path: Path, base_quant: dict | None = None) -> None:
    """Refuse a delta made from another base (or for the base quantized otherwise than `base_quant`,
    see fileformat.check_base_identity), or one that changes the base's architecture: what can be
    told from its config alone, without the model (a Ray Serve catalog checks this much)."""
    if config.base_fingerprint != base_fingerprint:  # first: with another base, the recipe is beside the point
        raise IncompatibleModelsError(f"{path} was made from base {config.base_model!r}, not the served base (fingerprint {config.base_fingerprint} != {base_fingerprint})")
    check_base_identity(config, path, base_fingerprint, base_quant)
    if config.model_type != model_type:
        raise IncompatibleModelsError(f"{path} is a {config.model_type} fine-tune; the served base is {model_type}")
    if config.removed:
        raise IncompatibleModelsError(f"{path} removes base tensors ({config.removed[0]}, ...); the engine serves only fine-tunes with the base's architecture")


def _check_config(config: DeltaConfig, model: MultiTenantModel, base_fingerprint: str, path: Path, base_quant: dict | None) -> None:
    """Refuse a delta the engine cannot serve exactly, before anything of it is loaded."""
    check_base(config, base_fingerprint, model.config.model_type, path, base_quant)
    for name, shape in config.compressed.items():
        base_shape = model.delta_shape(name)
        if base_shape is None:
            raise IncompatibleModelsError(f"{path}: {name} is 1-bit but is not a linear or an expert of the decoder blocks; "
                                          "the engine applies 1-bit deltas to those only")
        if tuple(shape) != base_shape:
            raise IncompatibleModelsError(f"{path}: {name} is {shape} in the delta but {list(base_shape)} in the base")
    for checkpoint_name, shape in config.dense.items():
        name = model.model_name(checkpoint_name)
        if not model.routable(name):
            raise IncompatibleModelsError(
                f"{path} stores {checkpoint_name} losslessly; the engine can apply per fine-tune only embeddings, norms, lm_head, "
                f"biases, MoE routers and 1-bit block linears (compress it without excluding {checkpoint_name}, or serve the merged model)"
            )
        if tuple(shape) != model.base_shape(name):
            raise IncompatibleModelsError(f"{path}: {name} is {shape} in the delta but {list(model.base_shape(name))} in the base (a grown vocabulary cannot share the base's batch)")


def read_weights(path: Path, model: MultiTenantModel, base_fingerprint: str, base_quant: dict | None = None) -> SlotWeights:
    """Read and verify a delta (checksums, shapes) into CPU memory in the slot layout."""
    reader = DeltaReader(path, verify=True)
    _check_config(reader.config, model, base_fingerprint, path, base_quant)  # the files may have changed since register
    pin = torch.cuda.is_available()
    signs, scales, dense = {}, {}, {}
    for name in reader.config.compressed:
        delta = reader.binary_delta(name)
        signs[name] = _maybe_pin(delta.signs.contiguous(), pin)
        scales[name] = _maybe_pin(delta.row_scales(), pin)
    for name in reader.config.dense:
        tensor = reader.dense(name)
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise DeltaFormatError(f"{path}: {name} is not a finite floating-point tensor; the delta is corrupted")
        dense[model.model_name(name)] = _maybe_pin(tensor.to(model.dtype), pin)
    return SlotWeights(signs, scales, dense, path)


def _maybe_pin(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin else tensor
