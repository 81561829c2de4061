"""Soak test: good and hostile clients against one `bitdelta serve`, bounded in time, loopback only.

    python -m benchmarks.soak [--seconds 120] [--good 6] [--hostile 3] [--out DIR]

Serves the demo's base and four 1-bit fine-tunes (bitdelta.demo.build_models and
bitdelta.multi_tenant_demo.make_deltas, trained once and cached) from `python -m bitdelta.server` on the
CPU, with fewer model slots than fine-tunes (--max-gpu-deltas 2), so deltas move between tiers all
along. For `--seconds`:

- good clients send greedy completions, streamed completions and chats, round-robin over the
  fine-tunes and the base; each answer must equal the answer the same request got during warm-up
  (an error, a non-200 or a different answer counts as a failed good request);
- hostile clients cycle through the attacks below, each with the status it must get;
- a prober reads /health every 0.2 s (its latency shows whether anything stalls the event loop);
- the server's resident memory (VmRSS) is sampled every second from the end of warm-up.

Writes soak.json and soak.md to --out (default benchmarks/results). Exits 1 if a good request failed
or an attack got an unexpected answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from benchmarks.local_server import start_server
from benchmarks.report import write_report

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.soak"
KEY, ADMIN_KEY = "soak-user", "soak-admin"
PROMPTS = ("The return value of", "def read_config(path):\n", "A module is")
MAX_TOKENS = 12


@dataclass(frozen=True)
class Attack:
    kind: str
    expected: frozenset[int]  # statuses that count as correctly handled (0: the client hung up by design)
    send: Callable[[httpx.Client], int]


def _post(body, headers: dict | None = None) -> Callable[[httpx.Client], int]:
    """A POST /v1/completions of `body`: a dict (sent as JSON), bytes, or a function making a fresh body iterator."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | (headers or {})
    content = body if isinstance(body, bytes) or callable(body) else json.dumps(body).encode()
    return lambda client: client.post("/v1/completions", content=content() if callable(content) else content, headers=headers).status_code


def _disconnect_mid_stream(client: httpx.Client) -> int:
    body = {"model": "prose-row", "prompt": PROMPTS[0], "max_tokens": 64, "stream": True}
    with client.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        next(response.iter_lines())  # the first event, then hang up
    return 0


def _admin(method: str, path: str, body: dict | None = None) -> Callable[[httpx.Client], int]:
    return lambda client: client.request(method, path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code


def attacks(vocab: int) -> list[Attack]:
    completion = {"model": "prose-row", "prompt": PROMPTS[0], "max_tokens": 4}
    return [
        Attack("temperature 1e-300", frozenset({200}), _post(completion | {"temperature": 1e-300})),
        Attack("top_p 1e-300", frozenset({200}), _post(completion | {"top_p": 1e-300, "temperature": 1.0})),
        Attack("10 MB body", frozenset({413}), _post(completion | {"prompt": "x" * 10_000_000})),
        Attack("10 MB chunked body", frozenset({413}), _post(lambda: (b" " * 65536 for _ in range(160)))),
        Attack("3 MB prompt", frozenset({400}), _post(completion | {"prompt": "word " * 600_000})),
        Attack("malformed JSON", frozenset({400}), _post(b'{"model": "prose-row",,')),
        Attack("non-UTF-8 body", frozenset({400}), _post(b"\xff\xfe{}")),
        Attack("seed 2**64", frozenset({400}), _post(completion | {"seed": 2**64})),
        Attack("lone surrogate", frozenset({400}), _post(json.dumps(completion | {"prompt": "\ud800"}).encode())),
        Attack("booleans as token ids", frozenset({400}), _post(completion | {"prompt": [True, False]})),
        Attack("token id out of vocabulary", frozenset({400}), _post(completion | {"prompt": [vocab + 5]})),
        Attack("response_format json", frozenset({400}), _post(completion | {"response_format": {"type": "json_object"}})),
        Attack("unknown model", frozenset({404}), _post(completion | {"model": "no-such-model"})),
        Attack("wrong API key", frozenset({401}), _post(completion, headers={"Authorization": "Bearer wrong"})),
        Attack("path traversal (admin)", frozenset({400, 404}), _admin("POST", "/v1/deltas", {"name": "../prose-row"})),
        Attack("disconnect mid-stream", frozenset({0}), _disconnect_mid_stream),
    ]


def good_requests(models: list[str]) -> list[tuple[str, dict]]:
    """(endpoint, body) of every good request, each answered identically every time (greedy)."""
    requests = []
    for model in models:
        for prompt in PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            requests += [("/v1/completions", body), ("/v1/completions", body | {"stream": True})]
        requests.append(("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Say something."}],
                                                   "max_tokens": MAX_TOKENS, "temperature": 0}))
    return requests


def answer(client: httpx.Client, endpoint: str, body: dict) -> str:
    """The text of a good request's answer; raises on anything but a complete 200."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if not body.get("stream"):
        response = client.post(endpoint, json=body, headers=headers)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    text, done = [], False
    with client.stream("POST", endpoint, json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                text.append(event["choices"][0]["text"])
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    return "".join(text)


class Soak:
    def __init__(self, url: str, models: list[str], vocab: int):
        self.url, self.requests, self.attacks = url, good_requests(models), attacks(vocab)
        self.expected: dict[int, str] = {}
        self.good = Counter()  # served, failed, mismatched
        self.good_errors: Counter = Counter()
        self.hostile: dict[str, Counter] = {a.kind: Counter() for a in self.attacks}
        self.health_ms: list[float] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            for index, (endpoint, body) in enumerate(self.requests):
                self.expected[index] = answer(client, endpoint, body)

    def good_client(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            index = offset
            while not self.stop.is_set():
                index = (index + 1) % len(self.requests)
                try:
                    outcome = "served" if answer(client, *self.requests[index]) == self.expected[index] else "mismatched"
                except Exception as error:  # noqa: BLE001 -- every failure of a good request is counted and reported
                    outcome = "failed"
                    with self.lock:
                        self.good_errors[f"{type(error).__name__}: {str(error)[:120]}"] += 1
                with self.lock:
                    self.good[outcome] += 1

    def hostile_client(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            index = offset
            while not self.stop.is_set():
                attack = self.attacks[index % len(self.attacks)]
                index += 1
                try:
                    status = attack.send(client)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                with self.lock:
                    self.hostile[attack.kind]["refused as expected" if status in attack.expected else f"got {status}"] += 1

    def prober(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                client.get("/health")
                self.health_ms.append((time.perf_counter() - start) * 1e3)
                time.sleep(0.2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(seconds: float, good: int, hostile: int) -> dict:
    from bitdelta.demo import SEQ_LEN, build_models, default_cache_dir
    from bitdelta.multi_tenant_demo import make_deltas

    cache = default_cache_dir()
    base, finetuned = build_models(cache)
    deltas_dir = cache / "serve-deltas"
    models = list(make_deltas(base, finetuned, deltas_dir, steps=40, seq_len=SEQ_LEN)) + [base.name]
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    log = cache / "soak-server.log"
    options = ["--device", "cpu", "--max-batch", "16", "--max-gpu-deltas", "2", "--max-queue", "64", "--api-key", KEY, "--admin-key", ADMIN_KEY]
    url, server = start_server(base, deltas_dir, options, log)
    try:
        soak = Soak(url, models, vocab)
        soak.warm_up()
        rss = [rss_mb(server.pid)]
        threads = [threading.Thread(target=soak.good_client, args=(i * 5,)) for i in range(good)]
        threads += [threading.Thread(target=soak.hostile_client, args=(i * 7,)) for i in range(hostile)]
        threads.append(threading.Thread(target=soak.prober))
        for thread in threads:
            thread.start()
        end = time.time() + seconds
        while time.time() < end:
            time.sleep(1)
            rss.append(rss_mb(server.pid))
        soak.stop.set()
        for thread in threads:
            thread.join()
        rss.append(rss_mb(server.pid))
        errors_logged = sum("ERROR" in line for line in log.read_text().splitlines())
    finally:
        server.terminate()
        server.wait(30)
    half = len(rss) // 2
    return {
        "reproduce": REPRODUCE,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "settings": {"seconds": seconds, "good_clients": good, "hostile_clients": hostile, "models": models,
                     "server": "--device cpu --max-batch 16 --max-gpu-deltas 2 --max-queue 64", "max_tokens": MAX_TOKENS},
        "good": dict(soak.good) | {"errors": dict(soak.good_errors), "distinct_requests": len(soak.requests)},
        "hostile": {kind: dict(counts) for kind, counts in soak.hostile.items()},
        "health_ms": {"probes": len(soak.health_ms), "median": statistics.median(soak.health_ms), "max": max(soak.health_ms)},
        "rss_mb": {"start": rss[0], "end": rss[-1], "max": max(rss), "median_first_half": statistics.median(rss[:half]),
                   "median_second_half": statistics.median(rss[half:]), "samples": rss},
        "server_log_error_lines": errors_logged,
    }


def markdown(result: dict) -> str:
    good, rss, health, settings = result["good"], result["rss_mb"], result["health_ms"], result["settings"]
    lines = [
        "# Soak: good and hostile clients against one server",
        "",
        f"Reproduce: `{result['reproduce']} --seconds {settings['seconds']:g} --good {settings['good_clients']} --hostile {settings['hostile_clients']}` "
        f"(trains and caches the demo models on first use). Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
        f"torch {result['machine']['torch']}. Server: the demo base and four 1-bit fine-tunes, `{settings['server']}` "
        "(fewer slots than fine-tunes: deltas move between tiers throughout).",
        "",
        f"**Good requests** (greedy completions, streamed completions and chats over {len(settings['models'])} models, "
        f"{good['distinct_requests']} distinct requests, each answer compared with its warm-up answer): "
        f"**{good.get('served', 0)} served, {good.get('failed', 0)} failed, {good.get('mismatched', 0)} answered differently**.",
        "",
        "| attack | requests | refused as expected | anything else |",
        "|---|---:|---:|---|",
    ]
    for kind, counts in result["hostile"].items():
        other = ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "refused as expected") or "-"
        lines.append(f"| {kind} | {sum(counts.values())} | {counts.get('refused as expected', 0)} | {other} |")
    lines += [
        "",
        "(`temperature 1e-300` and `top_p 1e-300` are valid requests: they must be served, and are counted as expected on 200; "
        "`disconnect mid-stream` hangs up after the first event.)",
        "",
        f"/health during the run: {health['probes']} probes, median {health['median']:.1f} ms, max {health['max']:.1f} ms.",
        "",
        f"Server resident memory (VmRSS) after warm-up {rss['start']:.0f} MB, at the end {rss['end']:.0f} MB, peak {rss['max']:.0f} MB; "
        f"median of the first half of the run {rss['median_first_half']:.0f} MB, of the second half {rss['median_second_half']:.0f} MB.",
        "",
        f"ERROR lines in the server log: {result['server_log_error_lines']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--good", type=int, default=6)
    parser.add_argument("--hostile", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    result = run(args.seconds, args.good, args.hostile)
    write_report(args.out, "soak", result, markdown(result))
    unexpected = sum(v for counts in result["hostile"].values() for k, v in counts.items() if k != "refused as expected")
    sys.exit(1 if result["good"].get("failed") or result["good"].get("mismatched") or unexpected else 0)


if __name__ == "__main__":
    main()
