"""Long prompts arriving while other fine-tunes decode: time to first token against the decoders'
step time, per prefill chunk size (`EngineConfig.prefill_chunk`, `bitdelta serve --prefill-chunk`).

    python -m benchmarks.chunked_prefill [--shape llama2-7b] [--decoders 31] [--arrivals 1x2048,4x512]
                                         [--chunks 256,512,1024,2048] [--out benchmarks/results]

The engine of `benchmarks/e2e.py` (Llama-2-7B shape, fp16, random weights built on the GPU, random
1-bit deltas, CUDA graphs for decode steps). `--decoders` requests of 128-token prompts, each its own
fine-tune, are admitted and decode; after 8 pure decode steps, the arrivals come at once: A requests
of P prompt tokens each (`AxP`), each its own fine-tune too. The engine prefills at most one chunk of
prompt tokens a step beside the decoders' rows, so a chunk trades the arrivals' time to first token
(TTFT: fewer, larger steps, and from 512 rows a delta the merged-weight GEMM: docs/kernels.md)
against the decoders' step time while it runs (each decoder waits a whole step for its next token).
Every configuration runs the scenario on one engine once to compile and capture, then `--repeats`
times measured: medians over every repeat's arrivals and steps. Writes chunked_prefill.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.e2e_models import SHAPES, llama_config, model_over, random_weights, serve_random_deltas
from benchmarks.e2e_systems import reset_peak
from benchmarks.report import write_report
from bitdelta.engine import Engine, EngineConfig, SamplingParams

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.chunked_prefill"
DECODER_PROMPT = 128
DECODE_STEPS_BEFORE = 8  # pure decode steps timed before the arrivals (the decoders' normal pace)
KV_BLOCK = 16
DECODE_TOKENS = 128  # the decoders' max_tokens: they never finish before the arrivals' first token


def parse_arrivals(text: str) -> list[tuple[int, int]]:
    """'1x2048,4x512' -> [(1, 2048), (4, 512)]: how many requests arrive together, and their prompt length."""
    arrivals = []
    for item in text.split(","):
        count, _, length = item.partition("x")
        if not (count.isdigit() and length.isdigit() and int(count) > 0 and int(length) > 0):
            raise SystemExit(f"--arrivals {item!r}: use COUNTxPROMPT_TOKENS, e.g. 1x2048")
        arrivals.append((int(count), int(length)))
    return arrivals


def scenario(engine: Engine, decoders: int, count: int, length: int, vocab: int) -> dict:
    """One run of the scenario: seconds of each step before and during the arrivals' prefill, and their TTFTs."""
    generator = torch.Generator().manual_seed(3)
    first_token: dict[int, float] = {}

    def submit(model: str, tokens: int, max_tokens: int) -> int:
        prompt = torch.randint(0, vocab, (tokens,), generator=generator).tolist()

        def emit(out) -> None:  # called from engine.step, on this thread, after submit has returned
            first_token.setdefault(request, time.perf_counter())

        request = engine.submit(model, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), emit)
        return request

    def timed_step() -> float:
        start = time.perf_counter()
        engine.step()  # ends with a host sync on the sampled tokens
        return time.perf_counter() - start

    decoder_ids = [submit(f"ft{t}", DECODER_PROMPT, DECODE_TOKENS) for t in range(decoders)]
    while not all(i in first_token for i in decoder_ids):
        timed_step()
    before = [timed_step() for _ in range(DECODE_STEPS_BEFORE)]
    arrived = time.perf_counter()
    arrival_ids = [submit(f"ft{decoders + a}", length, 1) for a in range(count)]
    during = []
    while not all(i in first_token for i in arrival_ids):
        during.append(timed_step())
    for request in decoder_ids:
        engine.cancel(request)
    while engine.has_work():
        engine.step()
    return {"before": before, "during": during, "ttft": [first_token[i] - arrived for i in arrival_ids]}


def summarise(runs: list[dict]) -> dict:
    """Medians (and maxima) over every repeat's steps and arrivals, in ms."""
    before, during, ttft = ([value * 1e3 for run in runs for value in run[key]] for key in ("before", "during", "ttft"))
    return {
        "repeats": len(runs),
        "decode_step_ms_before": statistics.median(before),
        "prefill_steps": len(runs[0]["during"]),
        "step_ms_during_median": statistics.median(during),
        "step_ms_during_max": max(during),
        "ttft_ms_median": statistics.median(ttft),
        "ttft_ms_max": max(ttft),
    }


def build_engine(config, weights, decoders: int, count: int, length: int, chunk: int) -> Engine:
    """An engine with room for the scenario and a fine-tune for every request (decoders first)."""
    tokens = decoders * (DECODER_PROMPT + DECODE_TOKENS) + count * (length + 1)
    engine_config = EngineConfig(max_batch=decoders + count, max_gpu_deltas=decoders + count, max_cpu_deltas=1,
                                 kv_block_size=KV_BLOCK, kv_blocks=-(-tokens // KV_BLOCK) + decoders + count,
                                 prefill_chunk=chunk, cuda_graphs=True)
    engine = Engine.from_model(model_over(config, weights), engine_config)
    serve_random_deltas(engine, list(range(decoders + count)))
    return engine


def run(config, weights, decoders: int, count: int, length: int, chunk: int, repeats: int) -> dict:
    engine = build_engine(config, weights, decoders, count, length, chunk)
    try:
        scenario(engine, decoders, count, length, config.vocab_size)  # compiles and captures
        return summarise([scenario(engine, decoders, count, length, config.vocab_size) for _ in range(repeats)])
    finally:
        engine.stop()


def markdown(result: dict) -> str:
    lines = [
        f"# Chunked prefill: {result['device']}, {result['shape']}, {result['decoders']} decoders (one fine-tune each)",
        "",
        f"`{result['command']}`. Arrivals: A requests of P prompt tokens come at once (each its own fine-tune) "
        "while the decoders run. TTFT from their arrival to their first token; step times are what each decoder "
        "waits for its next token. Medians (and maxima) over the measured repeats of each scenario on a warm engine.",
        "",
        "| arrivals | chunk | TTFT ms median | TTFT max | prefill steps | decoder step ms during: median | max | decode step ms before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['arrivals']} | {row['chunk']} | {row['ttft_ms_median']:.0f} | {row['ttft_ms_max']:.0f} | "
                     f"{row['prefill_steps']} | {row['step_ms_during_median']:.1f} | {row['step_ms_during_max']:.1f} | "
                     f"{row['decode_step_ms_before']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    parser.add_argument("--decoders", type=int, default=31)
    parser.add_argument("--arrivals", default="1x2048,4x512")
    parser.add_argument("--chunks", default="256,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs of each scenario (after one warm-up run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    arrivals = parse_arrivals(args.arrivals)
    chunks = [int(c) for c in args.chunks.split(",")]
    device = torch.device(args.device)
    config = llama_config(args.shape)
    weights = random_weights(config, device, torch.float16 if device.type == "cuda" else torch.float32)
    result = {
        "command": f"{REPRODUCE} --shape {args.shape} --decoders {args.decoders} --arrivals {args.arrivals} --chunks {args.chunks} --repeats {args.repeats}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "shape": args.shape,
        "decoders": args.decoders, "call": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": [],
    }
    for count, length in arrivals:
        for chunk in chunks:
            row = {"arrivals": f"{count}x{length}", "chunk": chunk, **run(config, weights, args.decoders, count, length, chunk, args.repeats)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            reset_peak(device)
    write_report(args.out, "chunked_prefill", result, markdown(result))


if __name__ == "__main__":
    main()
