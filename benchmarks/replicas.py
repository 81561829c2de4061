"""Replica scaling on Ray Serve: the application's throughput with 1, 2, 4, 8 engine replicas (one GPU each) over 64 fine-tunes.

    python -m benchmarks.replicas [--replicas 1,2,4,8] [--shape llama2-7b] [--finetunes 64] [--clients 128]
                                  [--requests-per-client 4] [--prompt 128] [--max-tokens 128] [--out benchmarks/results]
    python -m benchmarks.replicas --device cpu --shape tiny --replicas 1,2 --finetunes 8 --clients 4 \\
                                  --requests-per-client 2 --prompt 8 --max-tokens 8 --out /tmp/replicas   # a smoke run

A random model of --shape (`e2e_models`) is written as a checkpoint folder, and a deltas folder of
--finetunes fine-tunes: 8 random 1-bit deltas in the delta format, the others links to them (each
fine-tune still its own slot in a replica). For each replica count R (at most the GPUs visible), the
Ray Serve application (`bitdelta.ray`) runs R replicas on a local Ray cluster, and the clients send
greedy completions of random token prompts back to back, round-robin over the fine-tunes, through
its one endpoint. Scaling efficiency = tokens/s at R / (R x tokens/s at 1); goal at least 0.9.
Writes replicas.json and replicas.md to --out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.e2e_models import llama_config, random_weights, write_checkpoint, write_random_deltas
from benchmarks.local_server import free_port
from benchmarks.ray_overhead import run_workload
from benchmarks.report import write_report

HERE = Path(__file__).resolve().parent
DISTINCT_DELTAS = 8
GOAL = 0.9


def build_models(shape: str, finetunes: int, folder: Path) -> tuple[Path, Path, list[str]]:
    """The base checkpoint, the deltas folder and the fine-tunes' names."""
    config = llama_config(shape)
    base = write_checkpoint(config, random_weights(config, torch.device("cpu"), torch.float16), folder / "base")
    deltas = folder / "deltas"
    names = [f"ft{index}" for index in range(finetunes)]
    stored = write_random_deltas(base, names[:DISTINCT_DELTAS], deltas)
    for index, name in enumerate(names[DISTINCT_DELTAS:], start=DISTINCT_DELTAS):  # links inside the folder: served like it
        (deltas / name).symlink_to(stored[index % len(stored)].name, target_is_directory=True)
    return base, deltas, names


def measure(base: Path, deltas: Path, names: list[str], replicas: int, args) -> dict:
    import ray
    from ray import serve

    from bitdelta.engine import EngineConfig
    from bitdelta.ray import RayServeConfig, build_app

    cuda = args.device == "cuda"
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, num_gpus=torch.cuda.device_count() if cuda else 0, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = EngineConfig(device=args.device, dtype="float16" if cuda else "float32", max_batch=args.max_batch,
                              max_gpu_deltas=args.max_gpu_deltas, max_cpu_deltas=len(names))
        config = RayServeConfig(str(base), str(deltas), engine, replicas=replicas,
                                cpus_per_replica=max(1, (cores - 2) // replicas) if not cuda else 2)
        serve.run(build_app(config), name="bitdelta", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, llama_config(args.shape).vocab_size, (16, args.prompt), generator=generator).tolist()
        run_workload(url, names, len(names), 1, 4, prompts)  # warm-up: every fine-tune loaded somewhere
        started = time.perf_counter()
        result = run_workload(url, names, args.clients, args.requests_per_client, args.max_tokens, prompts)
        result["wall_s"] = time.perf_counter() - started
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Replica scaling on Ray Serve ({result['device']})", "",
             f"`python -m benchmarks.replicas`: a random {s['shape']}-shaped model, {s['finetunes']} fine-tunes ({DISTINCT_DELTAS} "
             f"distinct random deltas), one replica a GPU; {s['clients']} clients x {s['requests_per_client']} greedy completions of "
             f"{s['max_tokens']} tokens after {s['prompt']}-token prompts, round-robin over the fine-tunes.", "",
             "| replicas | tokens/s | p50 latency s | p99 latency s | efficiency (tokens/s / (R x 1 replica's)) |",
             "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['replicas']} | {row['tokens_per_s']:.0f} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['efficiency']:.2f} |")
    lines += ["", f"Goal: efficiency at least {GOAL} at every replica count: "
              f"{'met' if all(r['efficiency'] >= GOAL for r in result['rows']) else 'not met'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,4,8", help="replica counts (those above the GPUs visible are skipped)")
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--finetunes", type=int, default=64)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-gpu-deltas", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    counts = [int(r) for r in args.replicas.split(",")]
    if args.device == "cuda":
        counts = [r for r in counts if r <= torch.cuda.device_count()]
    with tempfile.TemporaryDirectory(prefix="bitdelta-replicas-") as folder:
        base, deltas, names = build_models(args.shape, args.finetunes, Path(folder))
        rows = []
        for replicas in sorted(set(counts) | {1}):  # one replica: what every efficiency is measured against
            row = {"replicas": replicas, **measure(base, deltas, names, replicas, args)}
            row["efficiency"] = row["tokens_per_s"] / (replicas * rows[0]["tokens_per_s"]) if rows else 1.0
            rows.append(row)
            print(f"{replicas} replicas: {row['tokens_per_s']:.0f} tokens/s, efficiency {row['efficiency']:.2f}", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {os.cpu_count()} cores"
    settings = {key: getattr(args, key) for key in ("shape", "finetunes", "clients", "requests_per_client", "prompt", "max_tokens",
                                                    "max_batch", "max_gpu_deltas")}
    result = {"device": device, "settings": settings, "rows": rows}
    write_report(args.out, "replicas", result, markdown(result))


if __name__ == "__main__":
    main()
