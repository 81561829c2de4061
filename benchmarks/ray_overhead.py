"""What Ray Serve costs: one workload through `bitdelta serve` and through the Ray Serve application
with one engine replica, side by side in one run, on this machine's CPU.

    python -m benchmarks.ray_overhead [--runs 3] [--clients 8] [--requests-per-client 6] [--max-tokens 32] [--out DIR]

Both serve the demo base and four 1-bit fine-tunes (bitdelta.demo.build_models and
bitdelta.multi_tenant_demo.make_deltas, trained once and cached) in float32 on the CPU with the same
engine settings; the Ray application runs on a local Ray cluster started here (its replica given
the machine's cores for torch, as the single server's process has them). Each client sends greedy
completions back to back, round-robin over the fine-tunes; tokens/s counts generated tokens over
the wall time of a run, latency is per request. The two systems alternate run by run (plain, Ray,
plain, Ray, ...) so drift on the machine falls on both; figures are medians over runs.
Writes ray_overhead.json and .md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.local_server import free_port, start_server
from benchmarks.report import write_report

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.ray_overhead"
PROMPTS = ("The return value of", "def read_config(path):\n", "A module is", "Raise an exception when")
ENGINE = {"device": "cpu", "dtype": "float32", "max_batch": 16}


def run_workload(url: str, models: list[str], clients: int, per_client: int, max_tokens: int, prompts=PROMPTS) -> dict:
    """`clients` threads each sending `per_client` greedy completions back to back, round-robin over
    `models` and `prompts` (texts, or token id lists): generated tokens/s over the wall time, latencies."""
    def client(index: int) -> tuple[int, list[float]]:
        tokens, latencies = 0, []
        with httpx.Client(base_url=url, timeout=600) as http:
            for step in range(per_client):
                body = {"model": models[(index + step) % len(models)], "prompt": prompts[(index + step) % len(prompts)],
                        "max_tokens": max_tokens, "temperature": 0}
                start = time.perf_counter()
                response = http.post("/v1/completions", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
                tokens += response.json()["usage"]["completion_tokens"]
        return tokens, latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    latencies = sorted(latency for _, per in results for latency in per)
    return {"tokens": sum(t for t, _ in results), "seconds": wall, "tokens_per_s": sum(t for t, _ in results) / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def start_ray(base: Path, deltas: Path, cores: int) -> str:
    import ray
    from ray import serve

    from bitdelta.engine import EngineConfig
    from bitdelta.ray import RayServeConfig, build_app

    ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = RayServeConfig(str(base), str(deltas), EngineConfig(**ENGINE), replicas=1, cpus_per_replica=cores)
    serve.run(build_app(config), name="bitdelta", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def run(runs: int, clients: int, per_client: int, max_tokens: int) -> dict:
    from bitdelta.demo import SEQ_LEN, build_models, default_cache_dir
    from bitdelta.multi_tenant_demo import make_deltas

    cache = default_cache_dir()
    base, finetuned = build_models(cache)
    deltas = cache / "serve-deltas"
    models = list(make_deltas(base, finetuned, deltas, steps=40, seq_len=SEQ_LEN))
    cores = os.cpu_count() or 1
    options = ["--device", ENGINE["device"], "--dtype", ENGINE["dtype"], "--max-batch", str(ENGINE["max_batch"]), "--log-level", "warning"]
    plain_url, plain = start_server(base, deltas, options, cache / "ray-overhead-server.log")
    ray_url = start_ray(base, deltas, cores)
    results: dict[str, list[dict]] = {"bitdelta serve": [], "Ray Serve, 1 replica": []}
    try:
        for url in (plain_url, ray_url):  # warm-up: every delta loaded, every code path run once
            run_workload(url, models, len(models), 1, 4)
        for _ in range(runs):
            for name, url in (("bitdelta serve", plain_url), ("Ray Serve, 1 replica", ray_url)):
                results[name].append(run_workload(url, models, clients, per_client, max_tokens))
                print(f"{name}: {results[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        plain.terminate()
        plain.wait(30)
        from ray import serve

        serve.shutdown()
    summary = {name: {key: statistics.median(r[key] for r in rows) for key in ("tokens_per_s", "p50_s", "p99_s")} for name, rows in results.items()}
    plain_rate, ray_rate = summary["bitdelta serve"]["tokens_per_s"], summary["Ray Serve, 1 replica"]["tokens_per_s"]
    return {
        "reproduce": REPRODUCE,
        "machine": {"platform": platform.platform(), "cpus": cores, "load_average_1min": os.getloadavg()[0]},
        "settings": {"runs": runs, "clients": clients, "requests_per_client": per_client, "max_tokens": max_tokens, "engine": ENGINE, "models": models},
        "summary": summary,
        "throughput_cost": 1 - ray_rate / plain_rate,
        "runs": results,
    }


def markdown(result: dict) -> str:
    settings, summary = result["settings"], result["summary"]
    lines = [
        "# Ray Serve's cost: one workload through `bitdelta serve` and through the Ray application (1 replica)",
        "",
        f"Reproduce: `{result['reproduce']} --runs {settings['runs']} --clients {settings['clients']} "
        f"--requests-per-client {settings['requests_per_client']} --max-tokens {settings['max_tokens']}`. "
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs (1-minute load average at the end: "
        f"{result['machine']['load_average_1min']:.1f}). Both serve the demo base and four 1-bit fine-tunes in float32 on the CPU, "
        f"--max-batch {settings['engine']['max_batch']}; {settings['clients']} clients send greedy completions of up to "
        f"{settings['max_tokens']} tokens back to back, round-robin over the fine-tunes. The systems alternate run by run; "
        f"medians of {settings['runs']} runs each.",
        "",
        "| system | tokens/s | p50 latency s | p99 latency s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {row['tokens_per_s']:.1f} | {row['p50_s']:.3f} | {row['p99_s']:.3f} |" for name, row in summary.items()]
    cost = result["throughput_cost"]
    lines += ["", f"Ray Serve's throughput cost: **{cost:.1%}** (goal: at most 10%)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    result = run(args.runs, args.clients, args.requests_per_client, args.max_tokens)
    write_report(args.out, "ray_overhead", result, markdown(result))


if __name__ == "__main__":
    main()
