"""End-to-end multi-tenant decoding on a GPU: memory and speed of N fine-tunes served at once.

    python -m benchmarks.e2e [--shape llama2-7b] [--tenants 1,2,4,8,16,32,64] [--zipf 64] [--busy 0]
                             [--prompt 128] [--generate 128] [--base-quant int8,fp8,int4] [--out benchmarks/results]
    python -m benchmarks.e2e --shape llama2-70b --systems '' --base-quant int4 --tenants 1,8 --zipf 0 --profile-tenants 0
    python -m benchmarks.e2e --shape llama2-70b --tensor-parallel 4 --systems bitdelta --tenants 1,2,4,8 --zipf 0 --profile-tenants 0

A Llama-2-7B-shaped base in fp16 with random weights, built on the GPU (speed does not depend on
the values), and N fine-tunes; a batch of B = N requests, one per fine-tune, each a 128-token
prompt and 128 generated tokens (greedy, no end-of-sequence stop); then B = 64 requests whose
fine-tunes follow a Zipf law (p ~ 1/rank) over 64; with --busy B, B requests of one fine-tune (the
few-delta kernels: one delta shared by the batch). Compared in one run:

  naive     each fine-tune a separate dense fp16 transformers model, batch = its own requests,
            one model after another each step. As many as fit stay on the GPU; the rest are
            copied in from pinned CPU memory when their turn comes (a swap: the whole model
            crosses PCIe). The host holds one pinned model copy that every swapped fine-tune
            is read from: the bytes moved are the same as with distinct copies, which 64 x 13.5 GB
            would not fit in any host's memory.
  bitdelta  `bitdelta.engine` (Engine.from_model + store.add): one base + N 1-bit deltas in GPU
            slots, every step one batch of all rows, Triton kernels (delta matmul, paged
            attention), continuous batching, paged KV cache.
  base      the same engine and batch with every request on the base model (slot -1): the upper
            bound bitdelta's extra reads are measured against.
  lora-rR   batched LoRA, the S-LoRA / Punica class: each fine-tune a rank-R adapter (R = 16 and 128;
            r = 128 is 0.64 GB a fine-tune against bitdelta's 0.76 GB) on every block linear, served
            by the same engine as bitdelta (continuous batching, paged KV cache, CUDA graphs): each
            linear computes the base product and adds its rows' adapters' products as two batched
            matmuls over the rows grouped by adapter (`benchmarks/lora_baseline.py`).

The random deltas are 8 distinct sets of bits and scales reused round-robin (each fine-tune still
occupies its own GPU slot; reading the slot costs the same whatever the bits are).

Per configuration: GPU memory (peak allocated), time to first token (median over requests), decode
latency per token (median and p99 of the per-step time of decode steps), decode tokens/s
(B / median step), and end-to-end tokens/s (generated tokens / wall time incl. prefill). The naive
run times fewer decode steps than 128 when a step takes long (`steps` in the table); its per-step
cost is constant across the generation. A torch.profiler trace of bitdelta's decode
at N = 32 says where the step's time goes. Writes e2e.json, e2e.md, e2e.png and e2e_profile.txt
to --out (default benchmarks/results); `--report-only` rewrites e2e.md and e2e.png from e2e.json. Another
--shape writes e2e_<shape>.*; `llama2-70b` (138 GB in fp16) is built with one layer's fp16 weights
shared by all 80 layers and measures only the runs over a quantized base, which the engine holds
per layer (a 70B base on one GPU beside its deltas). `--tensor-parallel N` serves bitdelta and base
only from N ranks (one a GPU): the model is written to a checkpoint folder first (138 GB for 70B;
`--checkpoint-dir`), each rank loads its share, and memory is rank 0's GPU; results as
e2e_<shape>_tp<N>.*.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.e2e_models import (SHAPES, SHARED_LAYERS, GiB, Setup, llama_config, model_bytes, random_weights, write_checkpoint,
                                   zipf_tenants)
from benchmarks.e2e_systems import profile_decode, reset_peak, run_base, run_bitdelta, run_lora, run_naive
from bitdelta.quant import RECIPES

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.e2e"
LORA_RANKS = (16, 128)


# ---- report ---------------------------------------------------------------------------------------------
def systems_of(row: dict) -> list[str]:
    """The systems a row measured, in the report's order: naive, LoRA by rank, bitdelta and base."""
    loras = sorted((k for k in row if k.startswith("lora-r")), key=lambda k: int(k.removeprefix("lora-r")))
    quantized = [f"{system}-{recipe}" for recipe in RECIPES for system in ("bitdelta", "base")]
    return [k for k in ("naive", *loras, "bitdelta-eager", "base-eager", "bitdelta", "base", *quantized) if k in row]


def stem(shape: str, tensor_parallel: int = 1) -> str:
    """The result files' name: e2e.* for the Llama-2-7B shape on one GPU, e2e_<shape>[_tp<N>].* otherwise."""
    if shape == "llama2-7b" and tensor_parallel == 1:
        return "e2e"
    return f"e2e_{shape}" + (f"_tp{tensor_parallel}" if tensor_parallel > 1 else "")


def markdown(result: dict, profile: str | None = None) -> str:
    """The results table; `profile`: the profile file's name, where one was written."""
    setup = result["setup"]
    tp = setup.get("tensor_parallel", 1)
    name = stem(setup["shape"], tp)
    split = (f" Tensor parallel over {tp} GPUs: memory is rank 0's GPU (each rank holds 1/{tp} of the model, the deltas and the KV"
             " cache); decode steps run eagerly (no CUDA graphs under tensor parallelism yet).") if tp > 1 else ""
    lines = [
        f"# End-to-end multi-tenant decoding ({setup['shape']}, {setup['dtype']}, {result['device']}{f', TP {tp}' if tp > 1 else ''})",
        "",
        f"`{REPRODUCE}` — B = N requests, one per fine-tune (Zipf row: B = 64 over 64 fine-tunes), {setup['prompt']}-token prompts, "
        f"{setup['generate']} generated tokens, greedy. Decode ms = per-step time of decode steps (median / p99); decode tok/s = B / median step; "
        "e2e tok/s = generated tokens / wall time incl. prefill; TTFT = median over requests. Memory = peak GPU memory allocated. "
        f"Model: {result['model_gib']:.2f} GiB fp16" + (f"; one delta {result['delta_gib_each']:.3f} GiB (1/{result['model_gib'] / result['delta_gib_each']:.1f} of the model)." if result.get("delta_gib_each") else ".") + split,
        "",
        "| N | system | memory GiB | TTFT ms | decode ms median | p99 | decode tok/s | e2e tok/s | steps timed | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for system in systems_of(row):
            r = row.get(system)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {row['label']} | {system} | | | | | | | | {r['error']} |")
                continue
            note = ""
            if system == "naive":
                note = f"{r['resident_models']} on the GPU" + (", the rest swapped from CPU" if r["swapping"] else "")
            elif system.startswith("lora"):
                note = f"adapters {r['adapter_gib']:.2f} GiB a fine-tune"
            elif "memory_note" in r:
                note = r["memory_note"]
            lines.append(
                f"| {row['label']} | {system} | {r['memory_gib']:.1f} | {r['ttft_ms']:.0f} | {r['decode_ms_median']:.1f} | {r['decode_ms_p99']:.1f} | "
                f"{r['decode_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['steps']} | {note} |"
            )
    measured: dict[tuple[str, str], list[str]] = {}  # (call, device) -> "N: systems" measured side by side in it
    for row in result["rows"]:
        by_call: dict[str, list[str]] = {}
        for system in systems_of(row):
            by_call.setdefault(row[system].get("call", row.get("call", "?")), []).append(system)
        for call, systems in by_call.items():
            measured.setdefault((call, row.get("device", result["device"])), []).append(f"{row['label']} ({', '.join(systems)})")
    if len(measured) > 1:
        lines += ["", "Measured in separate calls, the systems of one call side by side: "
                  + "; ".join(f"{call} on {device}: N = {'; '.join(rows)}" for (call, device), rows in sorted(measured.items())) + "."]
    lines += ["", "## Against the goals", ""] + [f"- {line}" for line in result["goals"]]
    lines += ["", f"![memory and decode latency against N]({name}.png)"]
    if profile:
        lines += ["", f"Where a step's time goes (bitdelta, eager and with CUDA graphs): {profile}; read in README.md."]
    return "\n".join(lines) + "\n"


def goals(result: dict) -> list[str]:
    row = next((r for r in result["rows"] if r["label"] == "32"), None)
    if row is None or any("error" in row.get(system, {"error": "not run"}) for system in ("bitdelta", "base")):
        return ["N = 32 was not run (or ran out of memory)"]
    bd, base, naive = row["bitdelta"], row["base"], row.get("naive")
    out = []
    if naive and "error" not in naive:
        ratio = bd["decode_tokens_per_s"] / naive["decode_tokens_per_s"]
        out.append(f"N = 32 decode throughput >= 10x naive: {ratio:.1f}x ({'met' if ratio >= 10 else 'not met'})")
    ratio = bd["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    out.append(f"N = 32 decode throughput >= 0.6x base only: {ratio:.2f}x ({'met' if ratio >= 0.6 else 'not met'})")
    for system in systems_of(row):
        lora = row[system] if system.startswith("lora") else None
        if lora and "error" not in lora:
            out.append(f"N = 32 decode throughput against batched LoRA {system.removeprefix('lora-')}: "
                       f"{bd['decode_tokens_per_s'] / lora['decode_tokens_per_s']:.2f}x, memory {bd['memory_gib']:.1f} against "
                       f"{lora['memory_gib']:.1f} GiB")
    setup = result["setup"]
    kv_read = bd["kv_gib"] * (setup["prompt"] + setup["generate"] / 2) / (setup["prompt"] + setup["generate"])  # mean context of a decode step
    deltas = row["distinct"] * result["delta_gib_each"]
    base_bytes, bitdelta_bytes = result["model_gib"] + kv_read, result["model_gib"] + kv_read + deltas
    out.append(f"bytes a decode step reads at N = 32: base {result['model_gib']:.1f} GiB + KV ~{kv_read:.1f} GiB, plus {deltas:.1f} GiB of delta bits for bitdelta: "
               f"at the memory floor bitdelta/base throughput = {base_bytes / bitdelta_bytes:.2f}x; measured steps are {bd['decode_ms_median'] / base['decode_ms_median']:.2f}x apart")
    budget = result["model_gib"] + 32 * result["model_gib"] / 14 + bd["kv_gib"]
    out.append(f"N = 32 memory under base + 32 x model/14 + KV cache = {budget:.1f} GiB: {bd['memory_gib']:.1f} GiB ({'met' if bd['memory_gib'] < budget else 'not met'})")
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["label"].isdigit()]  # N fine-tunes, one request each
    figure, (memory, latency) = plt.subplots(1, 2, figsize=(11, 4))
    loras = sorted({k for r in rows for k in r if k.startswith("lora-r")}, key=lambda k: int(k.removeprefix("lora-r")))
    quantized = [(f"{system}-{recipe}", style) for recipe in RECIPES for system, style in (("bitdelta", "s:"), ("base", "k:"))]
    for system, style in (("naive", "o-"), *((lora, "^-") for lora in loras), ("bitdelta", "s-"), ("base", "k--"), *quantized):
        points = [(r["n"], r[system]) for r in rows if system in r and "error" not in r[system]]
        if not points:
            continue
        ns = [n for n, _ in points]
        memory.plot(ns, [p["memory_gib"] for _, p in points], style, label=system)
        latency.plot(ns, [p["decode_ms_median"] for _, p in points], style, label=system)
    for axis, title in ((memory, "GPU memory (GiB)"), (latency, "decode latency per token (ms, median)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("fine-tunes served at once (N = batch)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    latency.set_yscale("log")
    memory.legend()
    figure.suptitle(f"{result['setup']['shape']} fp16, {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write(result: dict, folder: Path) -> None:
    result["goals"] = goals(result)
    folder.mkdir(parents=True, exist_ok=True)
    name = stem(result["setup"]["shape"], result["setup"].get("tensor_parallel", 1))
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    profile = f"{name}_profile.txt"
    (folder / f"{name}.md").write_text(markdown(result, profile if (folder / profile).exists() else None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    parser.add_argument("--tenants", default="1,2,4,8,16,32,64")
    parser.add_argument("--zipf", type=int, default=64, help="B = fine-tunes of the Zipf row (0: skip)")
    parser.add_argument("--busy", type=int, default=0,
                        help="a row of B requests of one fine-tune, which takes the few-delta kernels (0: skip)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--generate", type=int, default=128)
    parser.add_argument("--systems", default="naive,lora,bitdelta,eager",
                        help="bitdelta includes base only; lora: batched LoRA at each --lora-ranks; eager: bitdelta and base again "
                             "without CUDA graphs")
    parser.add_argument("--lora-ranks", default=",".join(map(str, LORA_RANKS)))
    parser.add_argument("--base-quant", default="", help="also bitdelta and base only over the base quantized by each of these "
                                                          "recipes (comma-separated: int8, fp8, int4), side by side")
    parser.add_argument("--tensor-parallel", type=int, default=1,
                        help="bitdelta and base only (and --base-quant) on N ranks, one a GPU: the model is written to "
                             "--checkpoint-dir first, and each rank loads its share; memory is rank 0's GPU")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="--tensor-parallel: where the model (base/) and random deltas (random-deltas/) are written (default: a temporary folder)")
    parser.add_argument("--max-seconds", type=float, default=6, help="naive: stop timing decode steps after this long (at least 2)")
    parser.add_argument("--profile-tenants", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="rewrite e2e.md and e2e.png from --out's e2e.json, measuring nothing")
    parser.add_argument("--append", action="store_true", help="keep the rows of --out's e2e.json that this run does not measure (a run split over calls)")
    args = parser.parse_args()
    name = stem(args.shape, args.tensor_parallel)
    if args.report_only:
        result = json.loads((args.out / f"{name}.json").read_text())
        write(result, args.out)
        plot(result, args.out / f"{name}.png")
        return
    systems = set(filter(None, args.systems.split(",")))
    if args.tensor_parallel > 1 and systems - {"bitdelta"}:
        parser.error(f"--tensor-parallel {args.tensor_parallel} measures bitdelta and base only (and --base-quant runs): pass --systems bitdelta")
    if args.shape in SHARED_LAYERS and systems and args.tensor_parallel == 1:
        parser.error(f"--shape {args.shape} shares one layer's fp16 weights across its layers (they would not fit): "
                     "only --base-quant runs measure it; pass --systems '' --base-quant int8,fp8,int4")

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    device = torch.device(args.device)
    setup = Setup(args.shape, args.prompt, args.generate, device, torch.float16 if device.type == "cuda" else torch.float32,
                  args.tensor_parallel)
    config = llama_config(args.shape)
    weights = random_weights(config, device if args.tensor_parallel == 1 else torch.device("cpu"), setup.dtype,
                             shared_layers=args.shape in SHARED_LAYERS)
    model_gib = model_bytes(weights) / GiB
    if args.tensor_parallel > 1:  # the ranks read their shares from files; the benchmark keeps no copy on a GPU
        folder = args.checkpoint_dir
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="bitdelta-e2e-"))
            atexit.register(shutil.rmtree, folder, True)
        weights = write_checkpoint(config, weights, folder / "base")  # random deltas go beside it (serve_random_deltas)
    result = {
        "command": f"{REPRODUCE} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "device")),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "setup": {"shape": args.shape, "prompt": args.prompt, "generate": args.generate, "dtype": str(setup.dtype).removeprefix("torch."),
                  "tensor_parallel": args.tensor_parallel},
        "model_gib": model_gib,
        "rows": [],
    }
    earlier_file = args.out / f"{name}.json"
    earlier = json.loads(earlier_file.read_text()) if args.append and earlier_file.is_file() else None
    cases = [(str(n), n, list(range(n))) for n in map(int, args.tenants.split(","))]
    if args.zipf:
        cases.append(("zipf", args.zipf, zipf_tenants(args.zipf, args.zipf)))
    if args.busy:
        cases.append(("busy", args.busy, [0] * args.busy))
    earlier_rows = {}
    if earlier is not None:
        measuring = {label for label, _, _ in cases}
        result["rows"] = [row for row in earlier["rows"] if row["label"] not in measuring]
        # a row measured again keeps the earlier call's systems this run does not measure, if on this device
        earlier_rows = {row["label"]: row for row in earlier["rows"] if row["label"] in measuring and row.get("device") == result["device"]}
        result["delta_gib_each"] = earlier.get("delta_gib_each")
        result["command"] = f"{earlier['command']} ; {result['command']}"
    for label, n, tenants_of_requests in cases:
        row = {"label": label, "n": n, "distinct": len(set(tenants_of_requests)), "device": result["device"], "call": started}
        kept = earlier_rows.get(label, {})
        row |= {system: kept[system] | {"call": kept[system].get("call", kept.get("call", "?"))} for system in systems_of(kept)}
        runs = [("naive", functools.partial(run_naive, max_seconds=args.max_seconds))] if "naive" in systems else []
        if "lora" in systems:
            runs += [(f"lora-r{rank}", functools.partial(run_lora, rank=int(rank))) for rank in args.lora_ranks.split(",")]
        if "bitdelta" in systems:
            runs += [("bitdelta", run_bitdelta), ("base", run_base)]
        for recipe in filter(None, args.base_quant.split(",")):
            runs += [(f"bitdelta-{recipe}", functools.partial(run_bitdelta, base_quant=recipe)),
                     (f"base-{recipe}", functools.partial(run_base, base_quant=recipe))]
        if "eager" in systems:  # the same engine issuing every kernel from Python
            runs += [("bitdelta-eager", functools.partial(run_bitdelta, graphs=False)), ("base-eager", functools.partial(run_base, graphs=False))]
        for system, run in runs:
            try:
                row[system] = run(setup, config, weights, tenants_of_requests)
            except torch.OutOfMemoryError as error:
                row[system] = {"error": f"out of GPU memory ({str(error).splitlines()[0][:80]})"}
            reset_peak(device)
        if "error" not in row.get("bitdelta", {"error": None}):  # one whole delta (each rank holds 1/N of it)
            result["delta_gib_each"] = row["bitdelta"]["delta_gib"] * args.tensor_parallel / row["distinct"]
        for system in systems_of(row):
            row[system].setdefault("call", started)
        result["rows"].append(row)
        result["rows"].sort(key=lambda r: (not r["label"].isdigit(), r["label"] == "zipf", r["n"]))
        print(json.dumps(row), flush=True)
        reset_peak(device)
        write(result, args.out)  # after every row: a run cut short keeps what it measured
    plot(result, args.out / f"{name}.png")
    if args.profile_tenants and "bitdelta" in systems and args.tensor_parallel == 1:
        report = [f"bitdelta at N = {args.profile_tenants}"]
        report += [profile_decode(setup, config, weights, args.profile_tenants, graphs) for graphs in (False, True)]
        (args.out / f"{name}_profile.txt").write_text("\n\n".join(report))
        write(result, args.out)  # the table now names the profile
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
