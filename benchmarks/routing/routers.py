"""The routing policies compared: Ray Serve's multiplexed routing, uniform random, and consistent
hashing with bounded loads (their rules: benchmarks/routing_sim.py's docstring)."""

from __future__ import annotations

import bisect
import hashlib
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a router reads the simulation's replicas and load; it never drives it
    from benchmarks.routing.simulation import Simulation

POLICIES = ("multiplexed", "random", "hash")
HASH_EPSILON = 0.25  # bounded-load consistent hashing: a replica takes at most (1 + eps) x the mean load
HASH_VNODES = 64


class Router:
    """Picks the replica for a request of `delta`; None when every replica refuses (it waits at the router)."""

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
