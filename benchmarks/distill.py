"""Scale distillation figures (issue 3): held-out loss and logit error of base, fine-tune,
BitDelta-Initial (matrix and row scales) and distilled BitDelta (MSE and KL losses, data-free),
with the distillation's wall time and peak memory.

    python -m benchmarks.distill --pair demo              # the demo's pair, on the CPU
    python -m benchmarks.distill --pair large --device cuda  # a ~100M-parameter pair trained on the GPU

Each distillation runs as its own `bitdelta distill` process, so its peak memory (resident set on
the CPU, allocated memory on the GPU) is its own. Paper defaults: 800 x 128 tokens, 200 steps,
Adam lr 1e-4, calibration data-free (sampled from the fine-tune).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitdelta import compress, load, tiny
from bitdelta.demo import build_models, default_cache_dir
from bitdelta.fileformat import DeltaReader

RESULTS = Path(__file__).parent / "results"
LARGE = tiny.TinySpec(family="llama", hidden=768, layers=12, heads=12, intermediate=2048, vocab=8192, context=256)


def build_large_pair(folder: Path, device: str, base_steps: int, finetune_steps: int) -> tuple[Path, Path]:
    """A ~100M Llama: base on stdlib code, full fine-tune on prose; saved in bf16 like real checkpoints."""
    base_dir, ft_dir = folder / "base", folder / "finetuned"
    if (ft_dir / "config.json").is_file():
        return base_dir, ft_dir
    code, prose = tiny.base_text(4_000_000), tiny.finetune_text(4_000_000)
    tokenizer = tiny.train_tokenizer(code, LARGE.vocab)
    model = tiny.build_model(LARGE, tokenizer).to(device)
    tiny.train(model, tiny.split(tiny.tokenize(tokenizer, code))[0], base_steps, batch=32, seq_len=256, lr=1e-3)
    tiny._save(model.to(torch.bfloat16), tokenizer, base_dir)
    model.float()
    tiny.train(model, tiny.split(tiny.tokenize(tokenizer, prose))[0], finetune_steps, batch=32, seq_len=256, lr=1e-4, seed=1)
    tiny._save(model.to(torch.bfloat16), tokenizer, ft_dir)
    return base_dir, ft_dir


def heldout_windows(ft_dir: Path, seq_len: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ft_dir)
    return {
        "prose": tiny.eval_windows(tiny.split(tiny.tokenize(tokenizer, tiny.finetune_text(4_000_000)))[1], 64, seq_len),
        "code": tiny.eval_windows(tiny.split(tiny.tokenize(tokenizer, tiny.base_text(4_000_000)))[1], 64, seq_len),
    }


@torch.no_grad()
def logit_errors(model, teacher_logits: list[torch.Tensor], windows: torch.Tensor) -> tuple[float, float]:
    """Full-vocabulary logit MSE and KL(fine-tune || model) on held-out prose."""
    device = next(model.parameters()).device
    mse, kl = [], []
    for batch, target in zip(windows.split(16), teacher_logits):
        logits = model(input_ids=batch.to(device)).logits.float().cpu()
        mse.append(torch.nn.functional.mse_loss(logits, target).item())
        kl.append(torch.nn.functional.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean").item() / batch.shape[1])
    return sum(mse) / len(mse), sum(kl) / len(kl)


def run_distill(base: Path, finetuned: Path, delta: Path, loss: str, device: str, args) -> dict:
    """One `bitdelta distill` process; its record, plus the 1-minute load average it started under
    (wall time on a shared CPU is only an upper bound)."""
    load_before = os.getloadavg()[0]
    command = [sys.executable, "-m", "bitdelta", "distill", str(base), str(finetuned), str(delta), "--loss", loss, "--device", device,
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--lr", str(args.lr), "-q"]
    subprocess.run(command, check=True)
    return {**DeltaReader(delta).config.distillation, "load_avg_before": load_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("demo", "large"), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bitdelta-distill-bench"))
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=150)  # the prose is ~170k tokens: more steps overfit
    args = parser.parse_args()
    work = args.workdir / args.pair
    start = time.perf_counter()
    if args.pair == "demo":
        base_dir, ft_dir = build_models(default_cache_dir(), log=print)
    else:
        base_dir, ft_dir = build_large_pair(work, args.device, args.base_steps, args.finetune_steps)
    train_seconds = time.perf_counter() - start
    from transformers import AutoModelForCausalLM

    windows = heldout_windows(ft_dir, args.seq_len)
    teacher = AutoModelForCausalLM.from_pretrained(ft_dir).to(args.device)
    with torch.no_grad():
        teacher_logits = [teacher(input_ids=b.to(args.device)).logits.float().cpu() for b in windows["prose"].split(16)]
    del teacher

    rows = []

    def evaluate(label: str, model, record: dict | None = None) -> None:
        mse, kl = logit_errors(model, teacher_logits, windows["prose"])
        row = dict(model=label, prose_loss=tiny.heldout_loss(model, windows["prose"]), code_loss=tiny.heldout_loss(model, windows["code"]), logit_mse=mse, kl=kl)
        if record:
            row.update(seconds=record["seconds"], peak_memory_gb=record["peak_memory_bytes"] / 1e9, device=record["device"],
                       load_avg_before=record["load_avg_before"])
        rows.append(row)
        print(row, flush=True)

    evaluate("base", AutoModelForCausalLM.from_pretrained(base_dir).to(args.device))
    evaluate("fine-tune", AutoModelForCausalLM.from_pretrained(ft_dir).to(args.device))
    deltas = {}
    for granularity in ("matrix", "row"):
        deltas[granularity] = compress(base_dir, ft_dir, work / f"delta-{granularity}", scale=granularity, overwrite=True, progress=False)
        evaluate(f"BitDelta-Initial ({granularity} scales)", load(base_dir, deltas[granularity], device=args.device))
    for loss in ("mse", "kl"):
        delta = work / f"delta-distilled-{loss}"
        shutil.rmtree(delta, ignore_errors=True)
        shutil.copytree(deltas["matrix"], delta)
        record = run_distill(base_dir, ft_dir, delta, loss, args.device, args)
        evaluate(f"BitDelta (distilled, {loss}, data-free)", load(base_dir, delta, device=args.device), record)

    base_loss, ft_loss = rows[0]["prose_loss"], rows[1]["prose_loss"]
    for row in rows:
        row["gain_kept"] = (base_loss - row["prose_loss"]) / (base_loss - ft_loss)
    params = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(ft_dir).parameters())
    result = dict(pair=args.pair, parameters=params, device=args.device, gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                  settings=dict(samples=args.samples, seq_len=args.seq_len, steps=args.steps, lr=args.lr), pair_build_seconds=train_seconds, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"distill_{args.pair}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"distill_{args.pair}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    command = f"python -m benchmarks.distill --pair {result['pair']} --device {result['device']}"
    loads = ", ".join(f"{r['load_avg_before']:.1f}" for r in result["rows"] if "load_avg_before" in r)
    lines = [
        f"# Scale distillation: {result['pair']} pair ({result['parameters'] / 1e6:.1f}M parameters, {result['gpu'] or 'CPU'})",
        "", f"Reproduce: `{command}`. Settings: {result['settings']}. Held-out text never seen in calibration. "
        f"{os.cpu_count()} CPU cores; 1-minute load average when each distillation started: {loads or 'not recorded'}.", "",
        "| model | prose loss | gain kept | code loss | logit MSE vs fine-tune | KL(fine-tune ‖ model) | distill s | peak memory GB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        extra = f"{r['seconds']:.1f} | {r['peak_memory_gb']:.2f}" if "seconds" in r else " | "
        lines.append(f"| {r['model']} | {r['prose_loss']:.4f} | {r['gain_kept']:.1%} | {r['code_loss']:.4f} | {r['logit_mse']:.4g} | {r['kl']:.4g} | {extra} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
