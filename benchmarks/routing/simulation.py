"""The simulation of one configuration: the workload (Setup), Poisson arrivals of Zipf-popular
fine-tunes, one event loop over the replicas' steps and disk reads, and the metrics of the window."""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from benchmarks.routing.costs import Costs
from benchmarks.routing.replica import Replica
from benchmarks.routing.routers import ROUTERS


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


class Simulation:
    """One configuration run once. Arrivals and their fine-tunes are drawn up front and the routers draw
    from `rng`, both seeded, so a configuration simulates the same way on every run (only `wall_s` differs)."""

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
