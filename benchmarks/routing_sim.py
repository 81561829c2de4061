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
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.routing.costs import load_costs, measure_disk_load
from benchmarks.routing.report import markdown, plot
from benchmarks.routing.sweep import FULL, QUICK, TTFT_TARGET_S, capacity, sweep

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.routing_sim"


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
