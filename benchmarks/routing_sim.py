"""Routing 10,000 fine-tunes over 1-64 engine replicas: a discrete-event simulation (issue 20).

    python -m benchmarks.routing_sim [--quick] [--out benchmarks/results] [--finetunes 10000] [--prompt 128]
                                     [--output 128] [--slots 32] [--cpu 256] [--max-ongoing 64]
                                     [--disk-s SECONDS] [--workers 2]

The full run sweeps Zipf exponents 0.8 / 1.0 / 1.2, 1 / 4 / 16 / 64 replicas, three routing
policies and 0.25-6 requests/s per replica, plus the disk read time halved and doubled at Zipf 1.0
on 64 replicas (about 5 minutes on 2 cores); --quick runs a small grid in seconds. Capacity is the
highest swept rate at which queues stay bounded and p99 time to first token stays under 5 s.

Requests for F fine-tunes (Zipf popularity, exponent s: rank r is asked for in proportion to
r^-s) arrive as a Poisson stream at a router in front of R replicas; each replica is one
`bitdelta.engine` on one GPU (Llama-2-7B, H100). The router is one of:

  multiplexed  Ray Serve's multiplexed routing (PowerOfTwoChoicesRequestRouter + MultiplexMixin,
               docs.ray.io/en/latest/serve/model-multiplexing.html): candidates are the replicas that
               report the model loaded (here: its delta in a GPU slot or the CPU tier); with none,
               the replicas with the fewest models loaded. Two candidates are drawn at random and the
               one with fewer ongoing requests (running + waiting) gets the request; a replica accepts
               only while it has fewer than --max-ongoing ongoing requests. When both refuse, the
               next tier is tried (fewest models, then all replicas); when every tier refuses, the
               request waits at the router and goes, oldest first (a request for a model the replica
               holds before others), to the next replica that finishes one. Serve's timeouts and
               backoff between tiers, and the delay before a replica's model list reaches the
               router, are left out (both favour this policy).
  random       a replica drawn uniformly.
  hash         consistent hashing of the fine-tune's name with bounded loads (Mirrokni et al.,
               2018): 64 virtual nodes a replica on a ring; the request goes to the first replica
               clockwise from its name's point whose ongoing requests are under
               max(B, ceil(1.25 * (all ongoing + 1) / R)). The floor B (not in the paper) keeps a
               fine-tune on its own replica while that replica has a free batch row: without it,
               at light load the bound is 1 and every second request for a fine-tune leaves home.

Each replica follows the engine's own rules (bitdelta/engine/engine.py, store.py):
  - requests join the running batch (at most B) oldest first, once their delta is in a GPU slot;
    a batch that is full stops admission; requests whose delta cannot get a slot are passed over;
  - a delta on disk is read by one loader thread, one delta at a time, into the CPU tier (at most
    C deltas, LRU on use); the read starts when admission first reaches a request for it;
  - a delta in the CPU tier fills a free slot, else the least recently used slot without running
    requests (S slots); the copy (delta bytes over PCIe) delays the step it happens before;
    when every slot has running requests, the least busy slot takes no new requests until it
    drains and passes to the oldest request waiting for a slot;
  - a step runs one token of every decoding sequence plus prompt chunks (at most 2048 tokens);
    a prompt's first token comes at the end of the step that completes its prefill;
  - a replica holds at most 1024 waiting requests; more are refused (and count as unstable).

Step durations are interpolated from measured H100 results (the `model` section of the JSON):
  - decode-only steps from benchmarks/results/e2e.json (bitdelta and base rows, N = 1..64, each row
    B = N requests of N distinct fine-tunes): step(B, D) = base(B) + [bitdelta(D) - base(D)], the
    base's cost at the batch size plus the delta overhead at D distinct deltas in the batch. CUDA
    graphs follow the engine's rule: the first step of a new batch composition (a sequence joined
    or left) runs eagerly (the "-eager" rows), the second captures (assumed: two eager passes plus
    the replay; not measured), later ones replay the graph;
  - a step with prompt tokens runs eagerly: prefill(k prompts) from e2e's TTFT at N = 1..16
    (N 128-token prompts of N fine-tunes prefilled in one step, nothing decoding), plus a fixed
    mixing cost when sequences are decoding in the same step, fitted to e2e's TTFT at N = 32 and 64
    (later chunks run beside the first chunks' decoders) and chunked_prefill.json (a chunk beside
    31 decoders). Prompt length does not enter: chunked_prefill.md measured about the same step
    for chunks of 256 to 2048 tokens;
  - disk -> CPU: measured here, reading and verifying (sha256) a 7B-shaped delta written by
    bitdelta's own writer, as the engine's loader does, with the page cache dropped (the fastest of
    5 reads; cached reads reported too); CPU -> GPU: the delta's bytes at an assumed 25 GB/s pinned
    host-to-device copy (not measured here).

Not modelled: network and tokenisation time, sampling, KV-cache limits (the engine reserves blocks
for max_batch sequences at full context), requests for the base model, stop strings ending
generation early (every request produces exactly --output tokens), and replicas failing. Metrics
are taken over a window after a warm-up: the caches start as the policy's own routing of a long
request stream would leave them (no time passes), then Setup.warmup simulated seconds run unmeasured.
Writes routing_sim.json, routing_sim.md and routing_sim.png to --out.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import itertools
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections import OrderedDict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.report import write_report

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.routing_sim"
POLICIES = ("multiplexed", "random", "hash")
GB = 1e9
GiB = 1024**3
H2D_GB_S = 25.0  # assumed pinned host-to-device bandwidth of an H100 host (PCIe Gen5 x16 in practice)
CAPTURE_EAGER_PASSES = 2  # a capture step: the engine's eager warm-up pass plus the capture pass (assumed)
HASH_EPSILON = 0.25  # bounded-load consistent hashing: a replica takes at most (1 + eps) x the mean load
HASH_VNODES = 64
TTFT_TARGET_S = 5.0  # the p99 time to first token the capacity table asks for (a cold delta's read alone is ~1.3 s)


@dataclass(frozen=True)
class Setup:
    """The workload and one replica's engine configuration (EngineConfig's defaults)."""

    finetunes: int = 10_000
    zipf: float = 1.0
    prompt: int = 128
    output: int = 128
    batch: int = 64  # max_batch
    slots: int = 32  # max_gpu_deltas
    cpu: int = 256  # max_cpu_deltas
    chunk: int = 2048  # prefill_chunk
    max_queue: int = 1024
    max_ongoing: int = 64  # Ray Serve's max_ongoing_requests (multiplexed routing only)
    warmup: float = 30.0  # simulated seconds before the measured window
    seconds: float = 120.0  # the measured window


# ---- step and load costs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """Seconds a replica spends on each kind of work, as lookup tables (index = rows or deltas)."""

    graph_base: tuple[float, ...]  # decode step replayed from a CUDA graph, by batch size (the base's cost)
    graph_delta: tuple[float, ...]  # ... plus this, by distinct deltas in the batch
    eager_base: tuple[float, ...]  # the same, issued eagerly (first step of a new composition)
    eager_delta: tuple[float, ...]
    prefill: tuple[float, ...]  # a step carrying k prompts' chunks, by k, nothing decoding
    mix: float  # added to a prefill step when sequences decode in it
    disk: float  # one delta, disk -> CPU (read + verify)
    h2d: float  # one delta, CPU -> GPU slot
    delta_gib: float

    def decode(self, rows: int, deltas: int, kind: str) -> float:
        if kind == "replay":
            return self.graph_base[rows] + self.graph_delta[deltas]
        eager = self.eager_base[rows] + self.eager_delta[deltas]
        return eager if kind == "eager" else CAPTURE_EAGER_PASSES * eager + self.graph_base[rows] + self.graph_delta[deltas]

    def prefill_step(self, prompts: int, decoding: bool) -> float:
        return self.prefill[min(prompts, len(self.prefill) - 1)] + (self.mix if decoding else 0.0)


def load_costs(results: Path, disk_s: float, rows: int = 64, deltas: int = 64, prompts: int = 2048) -> tuple[Costs, dict]:
    """Costs from e2e.json and chunked_prefill.json in `results`; also the model's description."""
    e2e = json.loads((results / "e2e.json").read_text())
    measured = sorted((r for r in e2e["rows"] if r["label"].isdigit()), key=lambda r: r["n"])
    n = np.array([r["n"] for r in measured], dtype=float)

    def table(system: str, size: int, minus: str | None = None) -> tuple[float, ...]:
        ms = np.array([r[system]["decode_ms_median"] - (r[minus]["decode_ms_median"] if minus else 0.0) for r in measured])
        values = np.interp(np.arange(size + 1), n, ms) / 1e3
        values[0] = 0.0
        return tuple(values.tolist())

    ttft = {r["n"]: r["bitdelta"]["ttft_ms"] for r in measured}
    one_chunk = [k for k in sorted(ttft) if k * e2e["setup"]["prompt"] <= 2048]  # prefilled in one step
    ks = np.arange(prompts + 1, dtype=float)
    pre = np.interp(ks, one_chunk, [ttft[k] for k in one_chunk])
    last = one_chunk[-1]
    pre[ks > last] = ttft[last] * ks[ks > last] / last  # beyond the measured, in proportion to the prompts
    pre[0] = 0.0
    # mixing cost: e2e's TTFT is the median over N requests of 128 tokens, 16 a step; at N = 32 it
    # is T1 + T2/2 and at N = 64 T1 + T2 + T3/2, where T1 = TTFT(16) is a pure 16-prompt step and
    # T2, T3 are 16-prompt steps beside 16 and 32 decoders; chunked_prefill's 2048-token steps
    # carry 1 or 4 prompts beside 31 decoders
    t1 = ttft[last]
    t2 = 2 * (ttft[2 * last] - t1)
    t3 = 2 * (ttft[4 * last] - t1 - t2)
    derived = {"e2e N=32: step 2 - step 1": t2 - t1, "e2e N=64: step 3 - step 1": t3 - t1}
    chunked_path = results / "chunked_prefill.json"
    if chunked_path.is_file():
        for row in json.loads(chunked_path.read_text())["rows"]:
            count = int(row["arrivals"].split("x")[0])
            if row["chunk"] == 2048:
                derived[f"chunked_prefill {row['arrivals']} beside 31 decoders"] = row["step_ms_during_median"] - pre[count]
    mix_ms = float(statistics.mean(derived.values()))
    delta_gib = e2e["delta_gib_each"]
    costs = Costs(
        graph_base=table("base", rows), graph_delta=table("bitdelta", deltas, "base"),
        eager_base=table("base-eager", rows), eager_delta=table("bitdelta-eager", deltas, "base-eager"),
        prefill=tuple((pre / 1e3).tolist()), mix=mix_ms / 1e3, disk=disk_s, h2d=delta_gib * GiB / (H2D_GB_S * GB), delta_gib=delta_gib,
    )
    zipf_row = next((r for r in e2e["rows"] if r["label"] == "zipf"), None)
    model = {
        "source": f"e2e.json ({e2e['device']}, {e2e['setup']['shape']}, {e2e['setup']['dtype']}) and chunked_prefill.json",
        "decode_step": (
            "base(B) + [bitdelta(D) - base(D)] from e2e decode medians (CUDA-graph replay; the '-eager' rows for the first step of "
            "a new composition; a capture step = 2 eager passes + replay, assumed)"
        ),
        "prefill_step": f"prefill(k prompts) from e2e TTFT at N <= {last} (one step), + {mix_ms:.0f} ms when sequences decode in the step",
        "prefill_ms": {int(k): round(float(pre[k]), 1) for k in one_chunk},
        "mix_ms": round(mix_ms, 1),
        "mix_ms_derivations": {k: round(float(v), 1) for k, v in derived.items()},
        "delta_gib": delta_gib,
        "h2d_ms": round(costs.h2d * 1e3, 1),
        "h2d_assumption": f"{delta_gib:.3f} GiB at {H2D_GB_S:.0f} GB/s pinned host-to-device (assumed, not measured here)",
        "disk_s": disk_s,
    }
    if zipf_row is not None:
        model["check_e2e_zipf_row"] = {
            "rows": zipf_row["n"], "distinct": zipf_row["distinct"], "measured_ms": round(zipf_row["bitdelta"]["decode_ms_median"], 1),
            "model_ms": round(costs.decode(zipf_row["n"], zipf_row["distinct"], "replay") * 1e3, 1),
        }
    return costs, model


def measure_disk_load(fraction: float = 1.0, repeats: int = 3) -> dict:
    """Seconds to read and verify a Llama-2-7B-shaped delta (1-bit block linears, per-row scales)
    as the engine's loader does (DeltaReader with checksums, then every matrix's signs and scales),
    with the file's pages dropped from the page cache first (posix_fadvise; a VM's host may still
    cache them) and again with them cached. `fraction` < 1 writes that share of the layers and
    scales the times up (quick runs)."""
    import torch

    from bitdelta.fileformat import DeltaConfig, DeltaReader, write_delta
    from bitdelta.pack import packed_words

    hidden, inner, layers = 4096, 11008, max(1, round(32 * fraction))
    shapes = {}
    for layer in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{layer}.self_attn.{name}.weight"] = [hidden, hidden]
        for name, shape in (("gate_proj", [inner, hidden]), ("up_proj", [inner, hidden]), ("down_proj", [hidden, inner])):
            shapes[f"model.layers.{layer}.mlp.{name}.weight"] = shape

    def tensors():
        generator = torch.Generator().manual_seed(0)
        for name, (n, k) in shapes.items():
            yield name + ".sign", torch.randint(-(2**31), 2**31 - 1, (n, packed_words(k)), dtype=torch.int32, generator=generator)
            yield name + ".scale", torch.rand(n, generator=generator)

    def config(files):
        return DeltaConfig("base", "-", "finetune", "-", "llama", "float16", 0, "row", shapes, {}, [], {}, files)

    def read(path: Path) -> float:
        started = time.perf_counter()
        reader = DeltaReader(path, verify=True)
        for name in reader.config.compressed:
            delta = reader.binary_delta(name)
            delta.signs.contiguous(), delta.row_scales()
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bitdelta-routing-") as folder:
        path = write_delta(Path(folder) / "delta", tensors(), config, [])
        files = [path / f for f in os.listdir(path) if f.endswith(".safetensors")]
        size = sum(f.stat().st_size for f in files)
        cold, warm = [], []
        for _ in range(repeats):
            for file in files:
                descriptor = os.open(file, os.O_RDONLY)
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(descriptor)
            cold.append(read(path))
            warm.append(read(path))
    scale = 32 / layers
    return {
        "gib": size * scale / GiB, "layers_written": layers, "scaled_by": scale,
        "cold_s": [t * scale for t in cold], "warm_s": [t * scale for t in warm],
        "cold_median_s": statistics.median(cold) * scale, "warm_median_s": statistics.median(warm) * scale,
        "cold_min_s": min(cold) * scale, "warm_min_s": min(warm) * scale,
    }


# ---- one engine replica ----------------------------------------------------------------------------
class Replica:
    """One engine: its waiting requests, running batch, GPU slots, CPU tier and disk loader."""

    def __init__(self, index: int, sim: Simulation):
        self.index, self.sim, self.setup, self.costs = index, sim, sim.setup, sim.costs
        self.slots: list[int | None] = [None] * self.setup.slots
        self.slot_of: dict[int, int] = {}  # delta -> slot
        self.slot_lru: OrderedDict[int, None] = OrderedDict()  # deltas in slots without running requests, LRU first
        self.users: dict[int, int] = {}  # delta -> running requests
        self.weights: set[int] = set()  # deltas in CPU memory
        self.cpu_lru: OrderedDict[int, None] = OrderedDict()  # the CPU tier's LRU order (entries touched by a slot acquire)
        self.waiting: dict[int, deque[int]] = {}  # delta -> waiting request ids, oldest first
        self.ready: list[tuple[int, int]] = []  # heap (oldest waiting request, delta): deltas to try
        self.for_slot: list[tuple[int, int]] = []  # the same for deltas waiting for a free slot
        self.loads: deque[int] = deque()  # the loader thread's queue
        self.loading: int | None = None
        self.fetching: set[int] = set()  # queued or loading
        self.resident = 0  # deltas in a slot or the CPU tier: the models it reports to Ray Serve
        self.n_waiting = self.n_running = self.n_decoding = 0
        self.prefilling: deque[list[int]] = deque()  # [request, prompt tokens left]
        self.finish_at: dict[int, list[int]] = {}  # step number -> requests ending with it
        self.step_no = 0
        self.busy = False
        self.version = self.seen = self.captured = 0  # decoding set's version; graph state
        self.draining: tuple[int, int] | None = None  # (request waiting for a slot, delta let drain)
        self.step_plan: tuple[int, list[int]] = (0, [])
        self.pending_installs = 0  # slot fills before the next step

    @property
    def ongoing(self) -> int:
        return self.n_waiting + self.n_running

    def holds(self, delta: int) -> bool:
        return delta in self.slot_of or delta in self.weights

    # ---- tiers -----------------------------------------------------------------------------------
    def _remember(self, delta: int) -> None:
        self.cpu_lru.pop(delta, None)
        self.cpu_lru[delta] = None
        while len(self.cpu_lru) > self.setup.cpu:
            old, _ = self.cpu_lru.popitem(last=False)
            self.weights.discard(old)
            self.sim.count("cpu_evictions")
            if old not in self.slot_of:
                self.sim.forget(self.index, old)

    def _take_slot(self) -> int | None:
        if len(self.slot_of) < len(self.slots):
            return self.slots.index(None)
        if not self.slot_lru:
            return None
        old, _ = self.slot_lru.popitem(last=False)
        slot = self.slot_of.pop(old)
        self.sim.count("slot_evictions")
        self.slots[slot] = None
        if old not in self.weights:
            self.sim.forget(self.index, old)
        return slot

    def _install(self, delta: int, slot: int) -> None:
        self.slots[slot], self.slot_of[delta] = delta, slot
        self.sim.count("installs")

    def _acquire(self, delta: int) -> None:
        self.slot_lru.pop(delta, None)
        self.users[delta] = self.users.get(delta, 0) + 1
        if delta in self.weights:
            self._remember(delta)

    def _release(self, delta: int) -> None:
        self.users[delta] -= 1
        if self.users[delta] == 0:
            del self.users[delta]
            self.slot_lru[delta] = None

    def prewarm(self, delta: int) -> None:
        """Serve `delta` once with no time passing: the tiers as a stream of requests leaves them."""
        if delta not in self.weights and delta not in self.slot_of:
            self.sim.hold(self.index, delta)
        if delta not in self.slot_of:
            if delta not in self.weights:
                self.weights.add(delta)
            self._install(delta, self._take_slot())
        self._acquire(delta)
        self._release(delta)

    # ---- requests --------------------------------------------------------------------------------
    def enqueue(self, request: int, delta: int, now: float) -> bool:
        if self.n_waiting >= self.setup.max_queue:
            return False
        self.n_waiting += 1
        queue = self.waiting.get(delta)
        if queue is None:
            self.waiting[delta] = queue = deque()
        queue.append(request)
        if len(queue) == 1 and delta not in self.fetching:
            heapq.heappush(self.ready, (request, delta))
        if not self.busy:
            self.start_step(now)
        return True

    def load_done(self, delta: int, now: float) -> None:
        self.loading = None
        self.fetching.discard(delta)
        self.weights.add(delta)
        self.sim.hold(self.index, delta)
        self.sim.count("disk_loads")
        if self.waiting.get(delta):
            heapq.heappush(self.ready, (self.waiting[delta][0], delta))
        self._next_load(now)
        if not self.busy:
            self.start_step(now)

    def _next_load(self, now: float) -> None:
        if self.loading is None and self.loads:
            self.sim.loader_queue(len(self.loads))
            self.loading = self.loads.popleft()
            self.sim.at(now + self.costs.disk, "load", self.index, self.loading)

    def _admit(self, now: float) -> None:
        """The engine's `_admit`: oldest first, while the batch has room."""
        if self.draining is not None and self.sim.state[self.draining[0]] != 0:
            self.draining = None  # its request is no longer waiting
        room = self.setup.batch - self.n_running
        aside, aside_slot, slots_busy = [], [], False
        while room > 0 and (self.ready or (self.for_slot and not slots_busy)):
            use_ready = self.ready and (slots_busy or not self.for_slot or self.ready[0] < self.for_slot[0])
            head, delta = heapq.heappop(self.ready if use_ready else self.for_slot)
            queue = self.waiting.get(delta)
            if not queue or queue[0] != head:
                continue  # a stale entry
            if delta not in self.slot_of and delta not in self.weights:
                if delta not in self.fetching:  # on disk: the loader reads it; its requests wait
                    self.fetching.add(delta)
                    self.loads.append(delta)
                    self._next_load(now)
                continue
            if delta not in self.slot_of:
                slot = None if slots_busy else self._take_slot()
                if slot is None:
                    slots_busy = True
                    if self.draining is None and self.users:
                        least_busy = min((self.users[d], s, d) for s, d in enumerate(self.slots) if d in self.users)
                        self.draining = (head, least_busy[2])
                    aside_slot.append((head, delta))
                    continue
                self._install(delta, slot)
                self.pending_installs += 1
            if self.draining is not None and delta == self.draining[1]:
                aside.append((head, delta))
                continue
            while queue and room > 0:
                request = queue.popleft()
                if self.draining is not None and self.draining[0] == request:
                    self.draining = None
                self._acquire(delta)
                self.n_waiting -= 1
                self.n_running += 1
                room -= 1
                self.prefilling.append([request, self.setup.prompt])
                self.sim.admitted(request)
            if queue:
                heapq.heappush(self.ready, (queue[0], delta))
            else:
                del self.waiting[delta]
        for entry in aside:
            heapq.heappush(self.ready, entry)
        for entry in aside_slot:
            heapq.heappush(self.for_slot, entry)

    # ---- steps -----------------------------------------------------------------------------------
    def start_step(self, now: float) -> None:
        self.pending_installs = 0
        self._admit(now)
        budget, done, prompts = self.setup.chunk, [], 0
        for item in self.prefilling:
            if budget == 0:
                break
            take = min(budget, item[1])
            item[1] -= take
            budget -= take
            prompts += 1
            if item[1] == 0:
                done.append(item[0])
        while self.prefilling and self.prefilling[0][1] == 0:
            self.prefilling.popleft()
        if prompts == 0 and self.n_decoding == 0:
            self.busy = False
            return
        if prompts:
            kind = "prefill"
            seconds = self.costs.prefill_step(prompts, self.n_decoding > 0)
        else:
            if self.version == self.captured:
                kind = "replay"
            elif self.version == self.seen:
                kind, self.captured = "capture", self.version
            else:
                kind, self.seen = "eager", self.version
            seconds = self.costs.decode(self.n_decoding, min(len(self.users), len(self.costs.graph_delta) - 1), kind)
        seconds += self.pending_installs * self.costs.h2d
        self.sim.count("steps_" + kind)
        self.sim.count("time_" + kind, seconds)
        self.busy = True
        self.step_no += 1
        self.step_plan = (self.n_decoding, done)
        self.sim.at(now + seconds, "step", self.index, None)

    def end_step(self, now: float) -> None:
        decoded, done = self.step_plan
        tokens = decoded + len(done)
        for request in done:
            self.sim.first_token(request, now)
            if self.setup.output > 1:
                self.finish_at.setdefault(self.step_no + self.setup.output - 1, []).append(request)
                self.n_decoding += 1
                self.version += 1
            else:
                self._finish(request, now)
        for request in self.finish_at.pop(self.step_no, ()):
            self.n_decoding -= 1
            self.version += 1
            self._finish(request, now)
        self.sim.count("tokens", tokens)
        self.start_step(now)

    def _finish(self, request: int, now: float) -> None:
        self.n_running -= 1
        self._release(self.sim.delta[request])
        self.sim.finished(request, self.index, now)


# ---- routers ---------------------------------------------------------------------------------------
class Router:
    def __init__(self, sim: Simulation):
        self.sim, self.replicas, self.rng = sim, sim.replicas, sim.rng

    def choose(self, delta: int) -> int | None:
        raise NotImplementedError


class RandomRouter(Router):
    def choose(self, delta: int) -> int:
        return self.rng.randrange(len(self.replicas))


class HashRouter(Router):
    """Consistent hashing with bounded loads."""

    def __init__(self, sim: Simulation):
        super().__init__(sim)
        points = sorted((_hash(f"replica-{r}-{v}"), r) for r in range(len(self.replicas)) for v in range(HASH_VNODES))
        self.ring, self.owner = [p for p, _ in points], [r for _, r in points]
        self.preference: dict[int, list[int]] = {}

    def order(self, delta: int) -> list[int]:
        if delta not in self.preference:
            start, found = bisect.bisect(self.ring, _hash(f"ft{delta}")), []
            for step in range(len(self.ring)):
                replica = self.owner[(start + step) % len(self.ring)]
                if replica not in found:
                    found.append(replica)
                    if len(found) == min(8, len(self.replicas)):
                        break
            self.preference[delta] = found
        return self.preference[delta]

    def choose(self, delta: int) -> int:
        bound = max(self.sim.setup.batch, math.ceil((1 + HASH_EPSILON) * (self.sim.ongoing + 1) / len(self.replicas)))
        for replica in self.order(delta):
            if self.replicas[replica].ongoing < bound:
                return replica
        return min(range(len(self.replicas)), key=lambda r: self.replicas[r].ongoing)


class MultiplexedRouter(Router):
    """Ray Serve: replicas holding the model, else those with the fewest models; power of two choices."""

    def fewest(self) -> list[int]:
        counts = [replica.resident for replica in self.replicas]
        least = min(counts)
        return [r for r, count in enumerate(counts) if count == least]

    def pick(self, candidates: list[int], limit: int) -> int | None:
        pair = candidates if len(candidates) <= 2 else self.rng.sample(candidates, 2)
        accepting = [r for r in pair if self.replicas[r].ongoing < limit]
        if not accepting:
            return None
        return min(accepting, key=lambda r: (self.replicas[r].ongoing, self.rng.random()))

    def choose(self, delta: int) -> int | None:
        limit = self.sim.setup.max_ongoing
        holders = list(self.sim.holders.get(delta, ()))
        for tier in (holders, None, range(len(self.replicas))):
            candidates = self.fewest() if tier is None else list(tier)
            if candidates:
                chosen = self.pick(candidates, limit)
                if chosen is not None:
                    return chosen
        return None


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


ROUTERS = {"multiplexed": MultiplexedRouter, "random": RandomRouter, "hash": HashRouter}


# ---- the simulation --------------------------------------------------------------------------------
class Simulation:
    def __init__(self, setup: Setup, costs: Costs, policy: str, replicas: int, rate: float, seed: int = 0):
        self.setup, self.costs, self.policy, self.rate = setup, costs, policy, rate
        self.rng = random.Random(seed)
        generator = np.random.default_rng(seed)
        popularity = np.arange(1, setup.finetunes + 1, dtype=float) ** -setup.zipf
        self.popularity = popularity / popularity.sum()
        end = setup.warmup + setup.seconds
        count = generator.poisson(rate * end)
        self.arrival = np.sort(generator.uniform(0, end, count)).tolist()  # a Poisson process on [0, end]
        self.delta = generator.choice(setup.finetunes, size=count, p=self.popularity).tolist()
        self.warm_stream = generator.choice(setup.finetunes, size=max(20_000, 3 * replicas * setup.cpu), p=self.popularity).tolist()
        self.state = [0] * count  # 0 waiting, 1 running, 2 done, 3 refused
        self.first = [math.inf] * count
        self.hit: list[str] = [""] * count
        self.holders: dict[int, set[int]] = {}
        self.replicas = [Replica(r, self) for r in range(replicas)]
        self.router = ROUTERS[policy](self)
        self.pending: deque[int] = deque()  # requests every replica refused (multiplexed only)
        self.ongoing = 0
        self.events: list = []
        self.sequence = 0
        self.counts: dict[str, float] = {}
        self.now = 0.0
        self.backlog: list[tuple[float, int]] = []
        self.longest_loader_queue = 0

    # ---- bookkeeping used by replicas ------------------------------------------------------------
    def at(self, when: float, kind: str, replica: int, payload) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, kind, replica, payload))

    def count(self, name: str, amount: float = 1) -> None:
        if self.now >= self.setup.warmup:
            self.counts[name] = self.counts.get(name, 0) + amount

    def hold(self, replica: int, delta: int) -> None:
        self.holders.setdefault(delta, set()).add(replica)
        self.replicas[replica].resident += 1

    def forget(self, replica: int, delta: int) -> None:
        self.holders[delta].discard(replica)
        self.replicas[replica].resident -= 1

    def loader_queue(self, length: int) -> None:
        """A read starts with `length` deltas queued at its replica's loader (itself included)."""
        self.count("reads_started")
        self.count("reads_queued", length)
        if self.now >= self.setup.warmup:
            self.longest_loader_queue = max(self.longest_loader_queue, length)

    def admitted(self, request: int) -> None:
        self.state[request] = 1

    def first_token(self, request: int, now: float) -> None:
        self.first[request] = now

    def finished(self, request: int, replica: int, now: float) -> None:
        self.state[request] = 2
        self.ongoing -= 1
        if self.pending:
            self.retry_pending(replica, now)

    # ---- routing ---------------------------------------------------------------------------------
    def route(self, request: int, now: float) -> None:
        delta = self.delta[request]
        chosen = self.router.choose(delta)
        if chosen is None:
            self.pending.append(request)
            return
        self.dispatch(request, chosen, now)

    def dispatch(self, request: int, replica: int, now: float) -> None:
        target, delta = self.replicas[replica], self.delta[request]
        self.hit[request] = "slot" if delta in target.slot_of else "cpu" if delta in target.weights else "miss"
        self.ongoing += 1
        if not target.enqueue(request, delta, now):
            self.ongoing -= 1
            self.state[request] = 3

    def retry_pending(self, replica: int, now: float) -> None:
        """Serve's FIFO fulfilment: a replica with room takes the oldest pending request for a
        model it holds (among the first 16), else the oldest."""
        target = self.replicas[replica]
        if target.ongoing >= self.setup.max_ongoing:
            return
        chosen = next((i for i, r in enumerate(itertools.islice(self.pending, 16)) if target.holds(self.delta[r])), 0)
        request = self.pending[chosen]
        del self.pending[chosen]
        self.dispatch(request, replica, now)

    # ---- running ---------------------------------------------------------------------------------
    def prewarm(self) -> None:
        saved, self.setup = self.setup, replace(self.setup, max_ongoing=10**9)
        for delta in self.warm_stream:
            self.replicas[self.router.choose(delta)].prewarm(delta)
        self.setup = saved

    def run(self) -> dict:
        self.prewarm()
        end = self.setup.warmup + self.setup.seconds
        arrivals, next_arrival, sample = self.arrival, 0, 0.0
        while True:
            upcoming = arrivals[next_arrival] if next_arrival < len(arrivals) else math.inf
            if self.events and self.events[0][0] <= upcoming:
                when, _, kind, replica, payload = heapq.heappop(self.events)
                if when > end:
                    break
                self.now = when
                if kind == "step":
                    self.replicas[replica].end_step(when)
                else:
                    self.replicas[replica].load_done(payload, when)
            elif upcoming <= end:
                self.now = upcoming
                while upcoming >= sample:
                    self.backlog.append((sample, self.waiting()))
                    sample += 1.0
                self.route(next_arrival, upcoming)
                next_arrival += 1
            else:
                break
        self.now = end
        return self.metrics()

    def waiting(self) -> int:
        return len(self.pending) + sum(r.n_waiting for r in self.replicas)

    def metrics(self) -> dict:
        setup, window = self.setup, self.setup.seconds
        measured = [i for i, t in enumerate(self.arrival) if t >= setup.warmup]
        # a request still without its first token counts with the time it has waited (a lower bound)
        ttft = sorted(min(self.first[i], self.now) - self.arrival[i] for i in measured)
        hits = [self.hit[i] for i in measured if self.hit[i]]
        sampled = [b for t, b in self.backlog if t >= setup.warmup]
        fifth = max(1, len(sampled) // 5)
        growth = statistics.mean(sampled[-fifth:]) - statistics.mean(sampled[:fifth]) if sampled else 0
        refused = sum(1 for i in measured if self.state[i] == 3)
        replicas = len(self.replicas)
        return {
            "policy": self.policy, "zipf": setup.zipf, "replicas": replicas, "rate": self.rate, "disk_s": self.costs.disk,
            "arrivals": len(self.arrival), "measured": len(measured),
            "completed": sum(1 for s in self.state if s == 2), "refused": sum(1 for s in self.state if s == 3),
            "in_flight": sum(1 for s in self.state if s in (0, 1)),
            "slot_hit": hits.count("slot") / max(1, len(hits)), "cpu_hit": hits.count("cpu") / max(1, len(hits)),
            "disk_loads_per_s": self.counts.get("disk_loads", 0) / window, "installs_per_s": self.counts.get("installs", 0) / window,
            "evictions": {tier: int(self.counts.get(f"{tier}_evictions", 0)) for tier in ("slot", "cpu")},
            "loader_queue_mean": self.counts.get("reads_queued", 0) / max(1, self.counts.get("reads_started", 0)),
            "loader_queue_max": self.longest_loader_queue,
            "ttft_p50_s": _quantile(ttft, 0.5), "ttft_p99_s": _quantile(ttft, 0.99),
            "tokens_per_s_per_replica": self.counts.get("tokens", 0) / window / replicas,
            "backlog_growth": growth, "backlog_end": sampled[-1] if sampled else 0,
            "stable": refused == 0 and growth <= 8 * replicas,
            "steps": {k.removeprefix("steps_"): int(v) for k, v in self.counts.items() if k.startswith("steps_")},
            # share of the replicas' time in each kind of step (the rest idle)
            "time_share": {k.removeprefix("time_"): round(v / window / replicas, 4) for k, v in self.counts.items() if k.startswith("time_")},
        }


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan


def simulate(setup: Setup, costs: Costs, policy: str, replicas: int, rate: float, seed: int = 0) -> dict:
    started = time.perf_counter()
    metrics = Simulation(setup, costs, policy, replicas, rate, seed).run()
    metrics["wall_s"] = time.perf_counter() - started
    return {k: round(v, 4) if isinstance(v, float) and k != "disk_s" else v for k, v in metrics.items()}


# ---- the sweep and its report ------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    zipfs: tuple[float, ...] = (0.8, 1.0, 1.2)
    replicas: tuple[int, ...] = (1, 4, 16, 64)
    rates: tuple[float, ...] = (0.25, 0.5, 1, 2, 3, 4, 5, 6)  # requests/s per replica
    policies: tuple[str, ...] = POLICIES
    # the disk read time times these, at Zipf 1.0 and the most replicas, for the affinity policies
    disk_factors: tuple[float, ...] = (0.5, 2.0)


FULL = (Grid(), Setup())
QUICK = (Grid(zipfs=(1.0,), replicas=(1, 4), rates=(0.5, 2), disk_factors=()), Setup(warmup=10.0, seconds=20.0))


def _run(args: tuple) -> dict:
    return simulate(*args)


def sweep(grid: Grid, setup: Setup, costs: Costs, workers: int) -> list[dict]:
    """Every configuration of the grid, the largest first so the workers finish together."""
    tasks = [(replace(setup, zipf=z), costs, policy, r, rate * r) for z in grid.zipfs for r in grid.replicas for policy in grid.policies for rate in grid.rates]
    most = max(grid.replicas)
    tasks += [
        (replace(setup, zipf=1.0), replace(costs, disk=costs.disk * factor), policy, most, rate * most)
        for factor in grid.disk_factors for policy in ("multiplexed", "hash") for rate in grid.rates
    ]
    tasks.sort(key=lambda t: -t[3] * (1 + t[4]))
    with ProcessPoolExecutor(workers) as pool:
        runs = list(pool.map(_run, tasks))
    return sorted(runs, key=lambda m: (m["disk_s"] != costs.disk, m["disk_s"], m["zipf"], m["replicas"], POLICIES.index(m["policy"]), m["rate"]))


def capacity(runs: list[dict], target: float) -> list[dict]:
    """Per (disk time, zipf, policy, replicas): the highest swept rate up to which every swept
    rate is stable with p99 TTFT <= target (0 when the lowest fails)."""
    out = []
    for key in sorted({(m["disk_s"], m["zipf"], m["policy"], m["replicas"]) for m in runs}, key=lambda k: (k[0], k[1], POLICIES.index(k[2]), k[3])):
        best = 0.0
        for m in sorted((m for m in runs if (m["disk_s"], m["zipf"], m["policy"], m["replicas"]) == key), key=lambda m: m["rate"]):
            if not (m["stable"] and m["ttft_p99_s"] <= target):
                break
            best = m["rate"]
        out.append({"disk_s": key[0], "zipf": key[1], "policy": key[2], "replicas": key[3], "max_rate": best})
    return out


def _row(m: dict) -> str:
    return (
        f"| {m['zipf']} | {m['replicas']} | {m['policy']} | {m['rate']:g} | {m['slot_hit']:.0%} | {m['cpu_hit']:.0%} | "
        f"{m['disk_loads_per_s']:.1f} | {m['installs_per_s']:.1f} | {m['ttft_p50_s']:.2f} | {m['ttft_p99_s']:.1f} | "
        f"{m['tokens_per_s_per_replica']:.0f} | {'yes' if m['stable'] else 'no'} |"
    )


HEADER = [
    "| Zipf | replicas | policy | req/s | slot hits | CPU hits | disk loads/s | slot fills/s | TTFT p50 s | p99 s | tok/s per replica | stable |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def _plural(count: int) -> str:
    return f"{count} replica{'s' if count > 1 else ''}"


def findings(result: dict) -> list[str]:
    """The paragraphs on replicas needed and where a replica's time goes, from the runs."""
    base, grid, setup, target = result["model"]["disk_s"], result["grid"], result["setup"], result["ttft_target_s"]
    cap = {(c["zipf"], c["policy"], c["replicas"]): c["max_rate"] for c in result["capacity"] if c["disk_s"] == base}
    zipf = 1.0 if 1.0 in grid["zipfs"] else grid["zipfs"][0]
    most = max(grid["replicas"])
    per_policy = "; ".join(f"{p}: " + ", ".join(f"{_plural(r)} {cap[(zipf, p, r)]:g}" for r in grid["replicas"]) for p in grid["policies"])
    best = max(grid["policies"], key=lambda p: cap[(zipf, p, most)])
    per = cap[(zipf, best, most)] / most
    sizing = (
        f"**Replicas needed.** For {setup['finetunes']:,} fine-tunes at Zipf {zipf} ({setup['prompt']} + {setup['output']} tokens a "
        f"request), the highest swept arrival rate (req/s) that keeps p99 TTFT under {target:g} s with bounded queues is — {per_policy}. "
    )
    if per > 0:
        sizing += (
            f"So with {best} routing {most} replicas carry {cap[(zipf, best, most)]:g} req/s ({per:.2f} a replica): a load of L req/s "
            f"needs about L / {per:.2f} replicas at that scale. Per-replica capacity grows with the replica count under affinity "
            f"routing, because the replicas' CPU tiers together ({most} x {setup['cpu']} = {most * setup['cpu']:,} deltas) partition the "
            f"fine-tunes instead of each caching the same popular ones; size at the scale you deploy."
        )
    else:
        sizing += f"No policy meets the target at {most} replicas at the lowest swept rate."
    out = [sizing]
    at = [m for m in result["runs"] if (m["disk_s"], m["zipf"], m["replicas"], m["policy"], m["rate"]) == (base, zipf, most, best, cap[(zipf, best, most)])]
    if at:
        m, share = at[0], at[0]["time_share"]
        out.append(
            f"**Where a replica's time goes** ({best}, {most} replicas, {m['rate']:g} req/s): {share.get('prefill', 0):.0%} in steps that "
            f"carry prompt tokens (eager, {result['model']['mix_ms']:.0f} ms more when sequences decode beside them), "
            f"{share.get('eager', 0) + share.get('capture', 0):.0%} in decode steps of a new batch composition (eager or capturing a graph), "
            f"{share.get('replay', 0):.0%} replaying graphs, the rest idle; {m['tokens_per_s_per_replica']:.0f} tokens/s a replica. "
            f"The delta loader: {m['disk_loads_per_s'] / most:.2f} disk reads/s a replica against at most {1 / base:.2f} "
            f"({base:.2f} s a read, one at a time); slot hits {m['slot_hit']:.0%}, CPU-tier hits {m['cpu_hit']:.0%}."
        )
        same = {r["policy"]: r for r in result["runs"] if (r["disk_s"], r["zipf"], r["replicas"], r["rate"]) == (base, zipf, most, m["rate"])}
        text = (
            "**Disk reads at the loaders** (same rate): deltas queued at a loader when a read starts, itself included (mean / max): "
            + "; ".join(f"{p} {r['loader_queue_mean']:.1f} / {r['loader_queue_max']}, p99 TTFT {r['ttft_p99_s']:.1f} s" for p, r in same.items()) + "."
        )
        if "multiplexed" in same and "hash" in same and same["multiplexed"]["loader_queue_mean"] > 1.3 * same["hash"]["loader_queue_mean"]:
            text += (
                " Multiplexed routing sends a fine-tune that no replica holds to the replicas holding the fewest models at that "
                "moment, so cold reads arrive at a few loaders together; hashing spreads them by name."
            )
        out.append(text)
    return out


def markdown(result: dict) -> str:
    model, disk, setup, grid = result["model"], result["disk_load"], result["setup"], result["grid"]
    base, target, most = model["disk_s"], result["ttft_target_s"], max(grid["replicas"])
    runs = [m for m in result["runs"] if m["disk_s"] == base]
    cap = {(c["disk_s"], c["zipf"], c["policy"], c["replicas"]): c["max_rate"] for c in result["capacity"]}
    check = model.get("check_e2e_zipf_row")
    lines = [
        f"# Routing {setup['finetunes']:,} fine-tunes over engine replicas (simulated; step costs measured on an H100)",
        "",
        (f"`{result['command']}` ({result['wall_s']:.0f} s on {os.cpu_count()} CPU cores). A discrete-event simulation; its "
        "assumptions are listed below and in the docstring of benchmarks/routing_sim.py. Poisson arrivals, Zipf popularity over the "
        f"fine-tunes; each replica is one engine with the engine's own rules (batch {setup['batch']}, {setup['slots']} GPU delta slots, "
        f"a CPU tier of {setup['cpu']} deltas, one disk loader, prefill chunk {setup['chunk']}); {setup['prompt']}-token prompts and "
        f"{setup['output']} generated tokens a request. Each configuration: {setup['warmup']:g} s warm-up, then {setup['seconds']:g} s "
        "measured; rates are for all replicas together."),
        "",
        *[paragraph + "\n" for paragraph in findings(result)],
        f"## Capacity: highest swept rate (req/s) that is stable with p99 TTFT <= {target:g} s",
        "",
        "Every lower swept rate passes too; 0: the lowest swept rate fails. Swept per replica: " + ", ".join(f"{r:g}" for r in grid["rates"]) + " req/s.",
        "",
        "| Zipf | policy | " + " | ".join(_plural(r) for r in grid["replicas"]) + " |",
        "|---|---|" + "---|" * len(grid["replicas"]),
    ]
    for zipf in grid["zipfs"]:
        for policy in grid["policies"]:
            lines.append(f"| {zipf} | {policy} | " + " | ".join(f"{cap[(base, zipf, policy, r)]:g}" for r in grid["replicas"]) + " |")
    disks = sorted({m["disk_s"] for m in result["runs"]})
    if len(disks) > 1:
        lines += ["", f"Sensitivity to the disk read time (Zipf 1.0, {_plural(most)}): highest passing rate, req/s.", "",
                  "| policy | " + " | ".join(f"{d:.2f} s a read" + (" (measured)" if d == base else "") for d in disks) + " |",
                  "|---|" + "---|" * len(disks)]
        for policy in ("multiplexed", "hash"):
            lines.append(f"| {policy} | " + " | ".join(f"{cap.get((d, 1.0, policy, most), math.nan):g}" for d in disks) + " |")
    key = [m for m in runs if m["zipf"] == 1.0 and m["replicas"] == most]
    if key:
        lines += ["", f"## Zipf 1.0, {_plural(most)}", "",
                  ("Slot / CPU hits: the request's delta was in a GPU slot / only in the CPU tier of the replica it was routed to, when "
                  "routed. Slot fills: CPU -> GPU copies. TTFT from arrival at the router."), ""]
        lines += HEADER + [_row(m) for m in key]
    lines += [
        "", "## The model and its inputs", "",
        f"- Decode step: {model['decode_step']}."
        + (f" Checked against e2e's Zipf row (B = {check['rows']}, {check['distinct']} distinct deltas): model {check['model_ms']} ms, "
           f"measured {check['measured_ms']} ms." if check else ""),
        f"- Prefill step: {model['prefill_step']}; prefill by prompts in the step (ms): {model['prefill_ms']}; the mixing cost is the "
        "mean of " + ", ".join(f"{k} = {v} ms" for k, v in model["mix_ms_derivations"].items()) + ".",
        f"- Disk -> CPU, measured on this machine: a {disk['gib']:.3f} GiB 7B-shaped delta written by `write_delta`, then read and "
        "verified (sha256) the way `read_weights` does, without pinning (no CUDA here); a shared VM, so other work on it adds noise. "
        f"Page cache dropped first: median {disk['cold_median_s']:.2f} s (runs " + ", ".join(f"{t:.2f}" for t in disk["cold_s"])
        + f"); cached: median {disk['warm_median_s']:.2f} s (runs " + ", ".join(f"{t:.2f}" for t in disk["warm_s"])
        + f"). The simulation uses {base:.2f} s a delta" + (" (given with --disk-s)" if base != disk["cold_min_s"] else
        ", the fastest cold read: reading and checksumming are mostly CPU work, so slower runs measure other work competing for "
        "this machine's 2 cores")
        + (f" (measured on {disk['layers_written']} of 32 layers, scaled)" if disk["scaled_by"] != 1 else "") + ".",
        f"- CPU -> GPU slot: {model['h2d_assumption']}: {model['h2d_ms']} ms, added to the step it precedes.",
        (f"- Multiplexed: a replica reports the deltas in its slots and CPU tier as its loaded models, with no delay; max_ongoing_requests "
        f"= {setup['max_ongoing']}. Hash: bounded loads, a replica full at max(B, ceil({1 + HASH_EPSILON:g} x mean ongoing)), "
        f"{HASH_VNODES} virtual nodes a replica."),
        ("- Stable: no request refused (1024 waiting at a replica) and the waiting requests grew by at most 8 per replica between "
        "the first and the last fifth of the window. TTFT percentiles count a request still waiting at the end with the time it "
        "had waited (a lower bound), so unstable rows show large, not exact, tails."),
        "- Not modelled: network, tokenisation, sampling, KV-cache limits, base-model requests, early stops, failures.",
        "", "## Every configuration", "",
    ]
    lines += HEADER + [_row(m) for m in runs]
    if len(disks) > 1:
        lines += ["", "With the disk read time changed (Zipf 1.0):", "", "| disk s " + HEADER[0], "|---" + HEADER[1]]
        lines += [f"| {m['disk_s']:.2f} " + _row(m) for m in result["runs"] if m["disk_s"] != base]
    lines += ["", "![p99 time to first token against the arrival rate, per routing policy](routing_sim.png)"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, grid = result["model"]["disk_s"], result["grid"]
    zipfs, counts = grid["zipfs"], [r for r in grid["replicas"] if r > 1] or grid["replicas"]
    figure, axes = plt.subplots(len(zipfs), len(counts), figsize=(4 * len(counts), 3.2 * len(zipfs)), squeeze=False)
    for row, zipf in enumerate(zipfs):
        for column, replicas in enumerate(counts):
            axis = axes[row][column]
            for index, policy in enumerate(grid["policies"]):
                color = f"C{index}"
                runs = [m for m in result["runs"] if (m["disk_s"], m["zipf"], m["replicas"], m["policy"]) == (base, zipf, replicas, policy)]
                axis.plot([m["rate"] for m in runs], [m["ttft_p99_s"] for m in runs], "-", color=color, label=policy)
                for m in runs:
                    axis.plot(m["rate"], m["ttft_p99_s"], "o" if m["stable"] else "x", color=color)
            axis.axhline(result["ttft_target_s"], color="grey", linestyle="--", linewidth=0.8)
            axis.set_yscale("log")
            axis.set_title(f"Zipf {zipf}, {_plural(replicas)}", fontsize=10)
            axis.set_xlabel("arrivals (req/s, all replicas)")
            axis.set_ylabel("p99 TTFT (s)")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="x: unstable", title_fontsize=8)
    figure.suptitle(f"{result['setup']['finetunes']:,} fine-tunes; replicas simulated with H100 step costs (Llama-2-7B); dashed: target")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid and short windows (seconds; for tests)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where e2e.json and chunked_prefill.json are read")
    parser.add_argument("--finetunes", type=int, default=10_000)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--cpu", type=int, default=256)
    parser.add_argument("--max-ongoing", type=int, default=64)
    parser.add_argument("--disk-s", type=float, default=None, help="seconds a delta takes disk -> CPU (default: measured here)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    grid, setup = QUICK if args.quick else FULL
    setup = replace(setup, finetunes=args.finetunes, prompt=args.prompt, output=args.output, slots=args.slots, cpu=args.cpu, max_ongoing=args.max_ongoing)
    disk = measure_disk_load(1 / 16, repeats=1) if args.quick else measure_disk_load(repeats=5)
    # the fastest cold read: the one least slowed by other work on a shared machine (sha256 is CPU-bound)
    disk_s = disk["cold_min_s"] if args.disk_s is None else args.disk_s
    costs, model = load_costs(args.results, disk_s, rows=setup.batch, deltas=max(setup.slots, 1), prompts=setup.chunk)
    runs = sweep(grid, setup, costs, args.workers)
    result = {
        "command": REPRODUCE + (" --quick" if args.quick else "") + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("quick", "out", "results", "workers") and v != parser.get_default(k)),
        "setup": asdict(setup), "grid": asdict(grid), "model": model, "disk_load": disk, "ttft_target_s": TTFT_TARGET_S,
        "runs": runs,
    }
    result["capacity"] = capacity(runs, TTFT_TARGET_S)
    result["wall_s"] = time.perf_counter() - started
    write_report(args.out, "routing_sim", result, markdown(result))
    plot(result, args.out / "routing_sim.png")


if __name__ == "__main__":
    main()
