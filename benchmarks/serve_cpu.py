"""Requests/s and tokens/s of `bitdelta serve` on a CPU, 1, 4 and 16 concurrent clients over 4 fine-tunes.

    python -m benchmarks.serve_cpu [--runs 3] [--requests-per-client 6] [--max-tokens 32] [--out DIR]

Uses the demo's models (bitdelta.demo.build_models: a Llama-style base of 256 hidden x 4 layers
trained on Python source, fine-tuned on prose; trained once and cached) and four deltas of that
base (bitdelta.multi_tenant_demo.make_deltas: the fine-tune at matrix and row scales, plus two more
fine-tunes trained here). Starts the real server (`python -m bitdelta.server`, float32, CPU) in a
subprocess; each client is a thread with the official `openai` client sending completions
back-to-back, round-robin over the four fine-tunes, greedy, `--max-tokens` tokens each (fewer if
the model ends early; tokens/s counts generated tokens from the usage field). Requests/s and
tokens/s are over the wall time of the whole level; median of `--runs`. While the 16-client level
runs, /metrics is sampled to measure the paged KV cache's padding waste.
Writes serve_cpu.json and serve_cpu.md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from benchmarks.local_server import start_server

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.serve_cpu"
CLIENTS = (1, 4, 16)
PROMPTS = ("The return value of", "def read_config(path):\n", "A module is", "Raise an exception when", "class Parser:\n    def")


def run_level(client, models: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    def worker(index: int) -> int:
        tokens = 0
        for step in range(per_client):
            model = models[(index + step) % len(models)]
            prompt = PROMPTS[(index * 7 + step) % len(PROMPTS)]
            tokens += client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).usage.completion_tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    requests = clients * per_client
    return {"requests": requests, "tokens": tokens, "seconds": wall, "requests_per_s": requests / wall, "tokens_per_s": tokens / wall}


def sample_kv(url: str, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        values = {}
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            for key, name in (("used", 'bitdelta_kv_cache_blocks{state="used"}'), ("tokens", "bitdelta_kv_cache_tokens "), ("running", "bitdelta_running_requests ")):
                if line.startswith(name):
                    values[key] = float(line.split()[-1])
        if values.get("used"):
            samples.append(values)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import openai

    from bitdelta.demo import SEQ_LEN, build_models, default_cache_dir
    from bitdelta.multi_tenant_demo import make_deltas

    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    cache = default_cache_dir()
    base, finetuned = build_models(cache)
    deltas_dir = cache / "serve-deltas"
    models = list(make_deltas(base, finetuned, deltas_dir, steps=40, seq_len=SEQ_LEN))
    url, server = start_server(base, deltas_dir, ["--device", "cpu", "--max-batch", "64"], cache / "serve-cpu-server.log")
    results, kv_samples = [], []
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        run_level(client, models, 4, 2, args.max_tokens)  # warm-up: loads every delta into a slot
        for clients in CLIENTS:
            stop = threading.Event()
            sampler = threading.Thread(target=sample_kv, args=(url, stop, kv_samples)) if clients == max(CLIENTS) else None
            if sampler:
                sampler.start()
            runs = [run_level(client, models, clients, args.requests_per_client, args.max_tokens) for _ in range(args.runs)]
            stop.set()
            if sampler:
                sampler.join()
            median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
            results.append({"clients": clients, "requests_per_s": median("requests_per_s"), "tokens_per_s": median("tokens_per_s"), "runs": runs})
            print(f"{clients:>3} clients: {results[-1]['requests_per_s']:.2f} requests/s, {results[-1]['tokens_per_s']:.1f} tokens/s")
    finally:
        server.terminate()
        server.wait(30)
    block = 16
    held = sum(s["used"] for s in kv_samples) * block
    waste = 1 - sum(s["tokens"] for s in kv_samples) / held if held else None
    report = {
        "reproduce": REPRODUCE,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}},
        "models": {"base": str(base), "deltas": models, "dtype": "float32", "device": "cpu"},
        "settings": {"requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens, "runs": args.runs, "max_batch": 64, "prompts": PROMPTS},
        "results": results,
        "kv_cache": {"samples": len(kv_samples), "block_size": block, "padding_waste": waste,
                     "mean_running": statistics.mean(s.get("running", 0) for s in kv_samples) if kv_samples else None},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_cpu.json").write_text(json.dumps(report, indent=2))
    (args.out / "serve_cpu.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    settings, kv = report["settings"], report["kv_cache"]
    lines = [
        "# Serving throughput on a CPU (`bitdelta serve`)",
        "",
        f"Reproduce: `{report['reproduce']}` (trains and caches the demo models on first use).",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} threads, torch {report['machine']['torch']} "
        f"(1-minute load average {report['machine']['load_average_1min']['before']:.1f} before, {report['machine']['load_average_1min']['after']:.1f} after: "
        "other processes shared the cores when it is above ~2). "
        f"Server: the demo base (Llama-style, 256 hidden x 4 layers, 256-token context) with four 1-bit fine-tunes "
        f"({', '.join(report['models']['deltas'])}), float32, CPU reference path, --max-batch 64. "
        f"Each client sends {settings['requests_per_client']} greedy completions back-to-back, round-robin over the four fine-tunes, "
        f"at most {settings['max_tokens']} tokens each; figures are the median of {settings['runs']} runs; "
        "the rows of different fine-tunes share every forward pass.",
        "",
        "| concurrent clients | requests/s | tokens/s |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} |" for r in report["results"]]
    if kv["padding_waste"] is not None:
        lines += ["", f"KV cache (paged, {kv['block_size']}-token blocks), sampled {kv['samples']} times during the 16-client level: "
                  f"{kv['padding_waste']:.1%} of the held slots were unfilled block tails (mean {kv['mean_running']:.1f} sequences running). "
                  "A cache padded to the context would hold 256 slots per sequence instead."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
