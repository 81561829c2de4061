"""The grid of configurations a run simulates, spread over worker processes, and the capacity each
(policy, replica count) shows: the highest swept rate that meets the TTFT target."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from benchmarks.routing.costs import Costs
from benchmarks.routing.routers import POLICIES
from benchmarks.routing.simulation import Setup, simulate

TTFT_TARGET_S = 5.0  # the p99 time to first token the capacity table asks for (a cold delta's read alone is ~1.3 s)


@dataclass(frozen=True)
class Grid:
    """What a run sweeps: every Zipf exponent x replica count x policy x rate, then the disk-time runs."""

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
