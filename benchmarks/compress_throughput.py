"""Wall time, throughput and peak memory of `bitdelta compress` and `bitdelta merge` on a >1 GB checkpoint.

    python -m benchmarks.compress_throughput [--workdir /tmp/bitdelta-throughput] [--out DIR]

Builds (once, cached in --workdir) a Llama-architecture pair in bf16, sharded by save_pretrained
at 500 MB: the base is a random init and the fine-tune is the base plus a small random perturbation
of every tensor (5% of its mean |value|, so even the all-ones norms change in bf16). The values are
not a real fine-tune, and they need not be: compress and merge do the same work per value whatever
the values are. Then runs the real CLI in a subprocess under /usr/bin/time -v and reports wall
seconds, GB/s (fine-tune bytes / wall), and peak RSS against the checkpoint size. Wall time
includes interpreter start, imports and building the model on the meta device; the checkpoint
files are in the page cache (just written or read), so disk speed is not measured.
Writes compress_throughput.json and .md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

REPRODUCE = "python -m benchmarks.compress_throughput"
SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)
PERTURBATION = 0.05  # fine-tune = base + N(0, 1) * 5% of the tensor's mean |value|


def build_pair(workdir: Path) -> tuple[Path, Path]:
    """The cached base and fine-tune directories, created on the first call."""
    base, ft, marker = workdir / "base", workdir / "finetune", workdir / "pair.json"
    spec = {"shape": SHAPE, "dtype": "bfloat16", "perturbation": PERTURBATION, "seed": 0}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return base, ft
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(workdir, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size="500MB")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            noise = torch.randn(tensor.shape) * (PERTURBATION * tensor.float().abs().mean())
            tensor.copy_((tensor.float() + noise).to(tensor.dtype))
    model.save_pretrained(ft, max_shard_size="500MB")
    marker.write_text(json.dumps(spec))
    return base, ft


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Run under /usr/bin/time -v; return (wall seconds, user + system CPU seconds, peak RSS bytes)."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    clock = re.search(r"Elapsed \(wall clock\) time .*: ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", result.stderr).group(1)) for kind in ("User", "System"))
    return seconds, cpu, rss_kb * 1024


def format_overhead(delta: Path) -> tuple[int, int]:
    """(bytes the shape formula of compression_factor.py predicts, bytes on disk) for this delta."""
    config = json.loads((delta / "bitdelta_config.json").read_text())
    predicted = sum(n * ((k + 31) // 32) * 4 + 4 for n, k in config["compressed"].values())
    for name, shape in config["dense"].items():
        predicted += torch.Size(shape).numel() * getattr(torch, config["dtypes"][name]).itemsize
    return predicted, weight_bytes(delta)


def heap_growth(n: int, k: int, iters: int) -> None:
    """Child mode: BinaryDelta.from_weights on an [n, k] bf16 pair `iters` times, keeping each result
    (as compress does until the delta shard is written); print the growth of anonymous RSS in bytes."""
    from bitdelta.delta import BinaryDelta

    def anon() -> int:
        return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    base = torch.randn(n, k).to(torch.bfloat16)
    finetuned = (base.float() + 0.01 * torch.randn(n, k)).to(torch.bfloat16)
    start, kept = anon(), [BinaryDelta.from_weights(base, finetuned) for _ in range(iters)]
    print(anon() - start, sum(d.signs.numel() * 4 for d in kept))


def fragmentation(shapes: list[tuple[int, int]], iters: int) -> list[dict]:
    """Anonymous RSS growth over repeated compression of one matrix shape, each in a fresh process."""
    rows = []
    for n, k in shapes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.compress_throughput", "--heap-growth", str(n), str(k), str(iters)],
                             capture_output=True, text=True, check=True).stdout.split()
        rows.append({"shape": [n, k], "fp32_temporary_mb": n * k * 4 / 1e6, "matrices": iters,
                     "anon_growth_bytes": int(out[-2]), "kept_sign_bytes": int(out[-1])})
        print(f"heap growth {n}x{k} x{iters}: {int(out[-2]) / 1e9:.2f} GB (signs kept {int(out[-1]) / 1e9:.3f} GB)", flush=True)
    return rows


def row(label: str, command: list[str], checkpoint: int, repeat: int, env: dict[str, str] | None = None) -> dict:
    """Median wall time and peak RSS over `repeat` runs (other jobs may share the cores: see load)."""
    walls, cpus, rsss, loads = [], [], [], []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        wall, cpu, rss = timed(command, env)
        walls.append(wall)
        cpus.append(cpu)
        rsss.append(rss)
    wall, cpu, rss = statistics.median(walls), statistics.median(cpus), statistics.median(rsss)
    print(f"{label}: {wall:.1f} s (runs {', '.join(f'{w:.1f}' for w in walls)}), peak RSS {rss / 1e9:.2f} GB", flush=True)
    shown = " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *command])
    return {"step": label, "command": shown, "checkpoint_bytes": checkpoint, "wall_s": wall, "wall_s_runs": walls,
            "cpu_s": cpu, "cpu_s_runs": cpus,
            "gb_per_s": checkpoint / 1e9 / wall, "peak_rss_bytes": rss, "peak_rss_bytes_runs": rsss,
            "rss_over_checkpoint": rss / checkpoint, "load_avg_1min_before_runs": loads}


def markdown(result: dict) -> str:
    lines = [
        "# Compress and merge throughput (CPU)",
        "",
        f"Reproduce: `{REPRODUCE}` (caches the model pair in /tmp/bitdelta-throughput; `--workdir` to move it).",
        "",
        f"Machine: {result['machine']}. Model: Llama architecture, {result['params'] / 1e6:.0f}M parameters, bf16, "
        f"{result['shape']}; saved with `save_pretrained(max_shard_size=\"500MB\")` ({result['shards']} shards). "
        "Base = random init; fine-tune = base + small random perturbation of every tensor (not a real fine-tune: "
        "compress and merge cost the same per value whatever the values are). Checkpoint files were in the page "
        "cache, so this measures compute and memory, not disk. Wall time includes Python start-up, imports and "
        f"building the model on the meta device; median of {result['repeat']} runs. GB = 1e9 bytes. Peak RSS is "
        "/usr/bin/time's maximum resident set size; it counts touched pages of memory-mapped checkpoint files too.",
        "",
        "| step | checkpoint GB | wall s | CPU s (user+sys) | GB/s (wall) | peak RSS GB | RSS / checkpoint |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        rate = "-" if r["step"] == "import floor" else f"{r['gb_per_s']:.3f}"
        lines.append(f"| {r['step']} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {rate} "
                     f"| {r['peak_rss_bytes'] / 1e9:.2f} | {r['rss_over_checkpoint']:.2f} |")
    d = result["delta"]
    lines += [
        "",
        "Commands (each under `/usr/bin/time -v`):",
        "",
        *[f"- {r['step']}: `{r['command']}`" for r in result["runs"]],
        "",
        f"Delta written: {d['bytes'] / 1e6:.1f} MB for a {result['finetune_bytes'] / 1e9:.3f} GB fine-tune "
        f"({result['finetune_bytes'] / d['bytes']:.2f}x; {d['compressed']} matrices 1-bit, {d['dense']} tensors lossless; "
        "the factor is low because the fp16 embeddings and lm_head are 15% of this small model). "
        f"The shape formula of `compression_factor.py` predicts {d['predicted_bytes']:,} bytes; the files hold "
        f"{d['bytes']:,} (difference = safetensors headers). 1-min load average before the runs: "
        f"{min(result['loads']):.1f} to {max(result['loads']):.1f} on {os.cpu_count()} cores (other jobs shared the "
        "machine when it is above ~2, which slows wall time more than CPU time; every run is in the JSON).",
        "",
        f"At the median compress rate, a Llama-2-7B fine-tune (13.48 GB in fp16) would take about "
        f"{13.48 / result['runs'][1]['gb_per_s'] / 60:.1f} min on this machine, and Llama-2-70B (137.95 GB) about "
        f"{137.95 / result['runs'][1]['gb_per_s'] / 60:.0f} min (linear extrapolation; imports are a smaller share there).",
        "",
        f"Heap growth check (why the compress peak above is partly a small-model effect): one matrix shape compressed "
        f"{result['fragmentation'][0]['matrices']} times in a fresh process, every result kept, as compress keeps them "
        "until its output shard is written:",
        "",
        "| matrix [N, K] | fp32 temporary MB | bf16 input compressed GB | anonymous RSS growth GB | signs kept GB |",
        "|---|---:|---:|---:|---:|",
        *[f"| {f['shape'][0]}x{f['shape'][1]} | {f['fp32_temporary_mb']:.0f} "
          f"| {f['shape'][0] * f['shape'][1] * 2 * f['matrices'] / 1e9:.2f} | {f['anon_growth_bytes'] / 1e9:.2f} "
          f"| {f['kept_sign_bytes'] / 1e9:.3f} |" for f in result["fragmentation"]],
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in NOTES],
    ]
    return "\n".join(lines) + "\n"


NOTES = [
    "Peak RSS of `compress` is about 3x the checkpoint, not 'one tensor pair plus a shard of output' as its "
    "docstring says. Two causes, both measured. (1) `ShardWriter` keeps the lossless tensors (embeddings, lm_head, "
    "every norm) as the zero-copy tensors safetensors returns, which are views of the fine-tune shard's memory map; "
    "holding one keeps that whole mapping alive after `Checkpoint.iter_tensors` closes the file, so every page read "
    "from every fine-tune shard stays resident until the delta is written: ~1.2 GB of file-backed RSS here, the "
    "whole fine-tune, and it would be the whole fine-tune for any model whose delta fits one output shard (2 GB "
    "default), e.g. 13.5 GB for Llama-2-7B. It is clean page cache the kernel can reclaim, but it counts in RSS and "
    "against cgroup limits. (2) glibc heap fragmentation, ~2 GB of anonymous RSS here: the per-matrix fp32 "
    "temporaries (float copies, difference, abs) are freed, but while they are at most 32 MB glibc's dynamic mmap "
    "threshold serves them from the heap, and the small results kept between them (scales, signs) pin the freed "
    "holes, so the heap grows with every matrix. Pinning the threshold (`MALLOC_MMAP_THRESHOLD_=131072` row) brings "
    "the peak down to about the floor + the mapped fine-tune (at a CPU cost: every large temporary is then a fresh, "
    "page-faulted mapping, so it is a diagnosis, not a setting to recommend). The heap growth table shows this is mostly a "
    "small-matrix effect: at this model's MLP shape the heap grows by more than the bf16 input it compressed, while "
    "at Llama-2-7B shapes the temporaries (67 and 180 MB) are mmapped and returned, and the growth is a small "
    "multiple of the kept signs (about a tenth of the input). Possible fixes in the package (not done "
    "here): `.clone()` lossless tensors before keeping them, and compute the delta in chunks of rows so no large temporaries are made.",
    "`merge` with the default `--max-shard-size` (5 GB) holds the whole merged model in memory before writing the "
    "single shard, so its peak is the floor + the full checkpoint + fragmentation; with 0.5 GB shards it drops (row "
    "'merge, 0.5 GB shards'). For a 70B model the default means ~5 GB of held output per shard.",
    "Throughput: compress is compute-bound: per matrix it makes fp32 copies of both weights, their difference, "
    "its absolute value and mean, then packs the signs with numpy. One cProfile of compress (in-process, same "
    "model) put ~60% of the time in that fp32 math, ~20% in pack_signs and most of the rest in importing "
    "transformers and building the model on the meta device for the target finder.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bitdelta-throughput"), help="model pair cache and outputs")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where to write the json and md")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step (median reported)")
    parser.add_argument("--heap-growth", type=int, nargs=3, metavar=("N", "K", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.heap_growth:
        return heap_growth(*args.heap_growth)

    base, ft = build_pair(args.workdir)
    next_to_python = Path(sys.executable).parent / "bitdelta"
    cli = str(next_to_python) if next_to_python.exists() else "bitdelta"
    delta, merged = args.workdir / "delta", args.workdir / "merged"
    compress = [cli, "compress", str(base), str(ft), "-o", str(delta), "--overwrite", "-q"]
    merge = [cli, "merge", str(base), str(delta), "-o", str(merged), "--overwrite", "-q"]
    size, n = weight_bytes(ft), args.repeat
    runs = [
        # What python + torch + transformers cost before any tensor is read: the floor under every RSS below.
        row("import floor", [sys.executable, "-c", "import torch, transformers.models.llama.modeling_llama"], size, n),
        row("compress", compress, size, n),
        # Same run with glibc's mmap threshold pinned: isolates heap fragmentation in the peak (see notes).
        row("compress, MALLOC_MMAP_THRESHOLD_=131072", compress, size, n, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
        row("merge", merge, size, n),
        # merge holds a whole output shard in memory before writing it (default 5 GB): smaller shards bound it.
        row("merge, 0.5 GB shards", [*merge, "--max-shard-size", "0.5"], size, n),
    ]
    # This model's MLP shape, then Llama-2-7B's two shapes: fp32 temporaries below / above glibc's 32 MB ceiling.
    heap = fragmentation([(SHAPE["hidden_size"], SHAPE["intermediate_size"]), (4096, 4096), (11008, 4096)], 30)
    config = json.loads((delta / "bitdelta_config.json").read_text())
    predicted, actual = format_overhead(delta)
    result = {
        "reproduce": REPRODUCE,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "shape": ", ".join(f"{k}={v}" for k, v in SHAPE.items()),
        "params": size // 2,
        "shards": len(list(ft.glob("*.safetensors"))),
        "finetune_bytes": size,
        "repeat": n,
        "loads": [load for r in runs for load in r["load_avg_1min_before_runs"]],
        "delta": {"bytes": actual, "predicted_bytes": predicted, "compressed": len(config["compressed"]),
                  "dense": len(config["dense"])},
        "runs": runs,
        "fragmentation": heap,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_throughput.json").write_text(json.dumps({**result, "notes": NOTES}, indent=2) + "\n")
    text = markdown(result)
    (args.out / "compress_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
