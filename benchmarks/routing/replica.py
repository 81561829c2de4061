"""One engine replica as the simulation sees it: bitdelta/engine/engine.py's admission and step
rules and store.py's GPU slots, CPU tier and disk loader, over simulated time."""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the simulation owns its replicas; a replica only calls back into it
    from benchmarks.routing.simulation import Simulation


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
