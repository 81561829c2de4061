"""Per-rank decode of a Llama-2-70B layer under tensor parallelism: each rank's share of the four
block products (q/k/v and gate/up by rows, o and down by columns, as `bitdelta serve
--tensor-parallel N` splits them) against that share's byte floor, plus the two all-reduces a layer
needs, measured over TP GPUs where that many are visible.

    python -m benchmarks.tensor_parallel [--tp 1,2,4,8] [--batches 1,8,32,64]

The products run on one GPU (a rank's work does not depend on the others'); the all-reduce of a
layer's two [batch, hidden] bf16 outputs is timed over TP GPUs when that many are visible
(torch.distributed, NCCL, one process a GPU), else reported as not measured.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.harness import Problem, measure_ceilings
from benchmarks.report import write_report

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 8192, 28672, 64, 8, 128  # Llama-2-70B


def rank_products(tp: int) -> dict[str, tuple[int, int]]:
    """(K, N) of a rank's share of each block product of one layer."""
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM // tp
    return {"qkv": (HIDDEN, qkv), "o": (HEADS * HEAD_DIM // tp, HIDDEN), "gate_up": (HIDDEN, 2 * INTERMEDIATE // tp),
            "down": (INTERMEDIATE // tp, HIDDEN)}


def measure(tp: int, batch: int, bandwidth: float) -> dict:
    """A rank's layer: each product's time (every row its own delta) and byte floor."""
    ours = floor = 0.0
    for k, n in rank_products(tp).values():
        problem = Problem.decode(k, n, batch, distinct=True)
        ours += problem.ours_us()
        floor += problem.floor_bytes() / bandwidth * 1e6
    return {"tp": tp, "batch": batch, "ours_us": ours, "floor_us": floor, "ours_over_floor": ours / floor}


def all_reduce_us(batch: int, world: int) -> float | None:
    """Median time of a layer's two all-reduces of [batch, hidden] bf16 over `world` GPUs, or None
    where fewer are visible."""
    if world < 2 or torch.cuda.device_count() < world:
        return None
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").Manager().list()
    mp.spawn(_all_reduce_rank, args=(world, port, batch, results), nprocs=world)
    return results[0]


def _all_reduce_rank(rank: int, world: int, port: int, batch: int, results) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tensor = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        dist.all_reduce(tensor)
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_reduce(tensor)
        dist.all_reduce(tensor)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    if rank == 0:
        results.append(statistics.median(times))
    dist.destroy_process_group()


def table(result: dict) -> str:
    lines = [f"# Per-rank decode of a Llama-2-70B layer under tensor parallelism ({result['device']})", "",
             "`python -m benchmarks.tensor_parallel` — a rank's share of q/k/v, o, gate/up and down, every row its own "
             f"delta, µs (median, CUDA graph, cold L2); floor = the share's bytes at the copy bandwidth measured in the run "
             f"({result['bandwidth_GBps']:.0f} GB/s). All-reduce: the layer's two over TP GPUs ({result['gpus']} visible).", "",
             "| TP | batch | ours µs | floor µs | ours / floor | within 1.3x? | all-reduce µs |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        reduce = "none" if row["tp"] == 1 else "not measured (too few GPUs)" if row["all_reduce_us"] is None else f"{row['all_reduce_us']:.1f}"
        lines.append(f"| {row['tp']} | {row['batch']} | {row['ours_us']:.1f} | {row['floor_us']:.1f} | {row['ours_over_floor']:.2f} | "
                     f"{'yes' if row['ours_over_floor'] <= 1.3 else '**no**'} | {reduce} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", default="1,2,4,8")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    rows = []
    for batch in map(int, args.batches.split(",")):
        rows += [measure(tp, batch, bandwidth) | {"all_reduce_us": all_reduce_us(batch, tp)} for tp in map(int, args.tp.split(","))]
    result = {"device": torch.cuda.get_device_name(), "bandwidth_GBps": bandwidth / 1e9, "gpus": torch.cuda.device_count(), "rows": rows}
    write_report(args.out, "tensor_parallel", result, table(result))


if __name__ == "__main__":
    main()
