"""benchmarks/routing/ and routing_sim.py: the simulator's logic on small workloads (no timing assertions)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.routing.costs import load_costs
from benchmarks.routing.routers import POLICIES
from benchmarks.routing.simulation import Setup, simulate
from benchmarks.routing_sim import main

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SHORT = Setup(warmup=10.0, seconds=30.0)


@pytest.fixture(scope="module")
def costs():
    return load_costs(RESULTS, disk_s=1.5)[0]


def test_step_model_reproduces_the_measured_rows(costs):
    e2e = json.loads((RESULTS / "e2e.json").read_text())
    for row in (r for r in e2e["rows"] if r["label"].isdigit()):
        n = row["n"]
        assert costs.decode(n, n, "replay") * 1e3 == pytest.approx(row["bitdelta"]["decode_ms_median"])
        assert costs.decode(n, n, "eager") * 1e3 == pytest.approx(row["bitdelta-eager"]["decode_ms_median"])
        if n * e2e["setup"]["prompt"] <= 2048:  # prefilled in one step with nothing decoding
            assert costs.prefill_step(n, decoding=False) * 1e3 == pytest.approx(row["bitdelta"]["ttft_ms"])
    assert costs.prefill_step(1, decoding=True) > costs.prefill_step(1, decoding=False)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_finetune_is_always_in_a_slot_after_warmup(costs, policy):
    # a load one replica carries: affinity policies keep every request on the fine-tune's first replica
    metrics = simulate(replace(SHORT, finetunes=1), costs, policy, replicas=4, rate=2.0)
    assert metrics["measured"] > 40
    assert metrics["slot_hit"] == 1.0
    assert metrics["disk_loads_per_s"] == 0 and metrics["installs_per_s"] == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_nothing_is_evicted_when_the_slots_hold_every_finetune(costs, policy):
    metrics = simulate(replace(SHORT, finetunes=20, slots=32), costs, policy, replicas=4, rate=4.0)
    assert metrics["evictions"] == {"slot": 0, "cpu": 0}
    assert metrics["slot_hit"] + metrics["cpu_hit"] > 0.99


def test_multiplexed_routing_finds_deltas_at_least_as_often_as_random(costs):
    setup = replace(SHORT, zipf=1.0)
    multiplexed = simulate(setup, costs, "multiplexed", replicas=8, rate=8.0)
    uniform = simulate(setup, costs, "random", replicas=8, rate=8.0)
    assert multiplexed["slot_hit"] >= uniform["slot_hit"]
    assert multiplexed["slot_hit"] + multiplexed["cpu_hit"] >= uniform["slot_hit"] + uniform["cpu_hit"]
    assert multiplexed["disk_loads_per_s"] <= uniform["disk_loads_per_s"]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_arrival_is_completed_refused_or_in_flight(costs, policy):
    # overloaded, with short queues: requests are refused (random, hash) or wait at the router (multiplexed)
    metrics = simulate(replace(SHORT, max_queue=8, max_ongoing=16), costs, policy, replicas=2, rate=40.0)
    assert metrics["completed"] > 0 and metrics["in_flight"] > 0
    assert metrics["arrivals"] == metrics["completed"] + metrics["refused"] + metrics["in_flight"]
    assert not metrics["stable"]


def test_light_load_is_stable_and_served(costs):
    metrics = simulate(replace(SHORT, finetunes=50), costs, "hash", replicas=2, rate=1.0)
    assert metrics["stable"] and metrics["refused"] == 0
    assert metrics["ttft_p99_s"] < SHORT.seconds


def test_a_quick_run_writes_its_files(tmp_path):
    main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "routing_sim.json").read_text())
    assert {m["policy"] for m in result["runs"]} == set(POLICIES)
    assert result["disk_load"]["cold_median_s"] > 0
    assert "Replicas needed" in (tmp_path / "routing_sim.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "routing_sim.png").stat().st_size > 0
