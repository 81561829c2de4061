"""`bitdelta demo`: the whole method end to end on a model trained here, no downloads.

A small Llama-style base learns Python source, a copy is fully fine-tuned on English prose, the
fine-tune is compressed to a 1-bit delta (per-matrix and per-row scales), its scales distilled
(data-free), and merged back; the held-out loss of each model is measured on both domains.
Finally a second fine-tune (upper-case prose) is compressed and both are served by the
multi-tenant engine in the same batches, their greedy answers checked against each merged model.
Every model and delta is cached (CACHE_VERSION names the recipe), so a second run only measures.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitdelta import tiny
from bitdelta.apply import load, merge
from bitdelta.compress import compress
from bitdelta.distill import DistillConfig
from bitdelta.fileformat import DeltaReader
from bitdelta.multi_tenant_demo import serve_two_in_one_batch
from bitdelta.progress import step_progress

DEMO_SPEC = tiny.TinySpec(family="llama", hidden=256, layers=4, heads=8, intermediate=688, vocab=2048, context=256)
BASE_STEPS, FINETUNE_STEPS, SECOND_FINETUNE_STEPS, SEQ_LEN, TEXT_CHARS = 200, 100, 40, 128, 2_000_000
# Data-free calibration (no data set needed), fewer samples than the paper's 800 to stay ~2 minutes.
DEMO_DISTILL = DistillConfig(samples=128, seq_len=SEQ_LEN, steps=100, lr=1e-4, heldout=16)
CACHE_VERSION = "v1"  # bump when the recipe above changes, so old caches are not reused


def default_cache_dir() -> Path:
    return Path(os.environ.get("BITDELTA_CACHE", Path.home() / ".cache" / "bitdelta")) / "demo" / CACHE_VERSION


@dataclass
class DemoResult:
    rows: list[tuple[str, float, float]] = field(default_factory=list)  # (model, loss on fine-tune text, loss on base text)
    sizes: dict[str, int] = field(default_factory=dict)  # name -> bytes
    seconds: dict[str, float] = field(default_factory=dict)
    batch: list = field(default_factory=list)  # bitdelta.multi_tenant_demo.BatchRow: two deltas answered in one batch


def build_models(cache: Path, log=print) -> tuple[Path, Path]:
    """Train (or reuse) the demo's base and fine-tune; return their checkpoint directories."""
    base_dir, ft_dir = cache / "base", cache / "finetuned"
    if (ft_dir / "config.json").is_file() and (base_dir / "config.json").is_file():
        log(f"reusing the cached base and fine-tune in {cache}")
        return base_dir, ft_dir
    torch.manual_seed(0)
    log("training the base model on Python source (stdlib)...")
    code = tiny.base_text(TEXT_CHARS)
    tokenizer = tiny.train_tokenizer(code, DEMO_SPEC.vocab)
    model = tiny.build_model(DEMO_SPEC, tokenizer)
    _train(model, tiny.split(tiny.tokenize(tokenizer, code))[0], BASE_STEPS, "training the base", seed=0, lr=3e-3)
    tiny._save(model, tokenizer, base_dir)
    log("fine-tuning a copy on English prose (pydoc topics)...")
    prose = tiny.finetune_text(TEXT_CHARS)
    _train(model, tiny.split(tiny.tokenize(tokenizer, prose))[0], FINETUNE_STEPS, "fine-tuning", seed=1)
    tiny._save(model, tokenizer, ft_dir)
    return base_dir, ft_dir


def build_second_finetune(cache: Path, base_dir: Path, log=print) -> Path:
    """Another genuine fine-tune of the same base (upper-case prose: a distinct style), so the demo
    can serve two different fine-tunes in one batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ft_dir = cache / "finetuned-caps"
    if (ft_dir / "config.json").is_file():
        return ft_dir
    log("fine-tuning a second copy on UPPER-CASE prose...")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    caps = tiny.finetune_text(TEXT_CHARS).upper()
    _train(model, tiny.split(tiny.tokenize(tokenizer, caps))[0], SECOND_FINETUNE_STEPS, "fine-tuning (upper case)", seed=2)
    tiny._save(model, tokenizer, ft_dir)
    return ft_dir


def _train(model, tokens: torch.Tensor, steps: int, description: str, seed: int, lr: float = 1e-3) -> None:
    with step_progress(description, steps) as advance:
        tiny.train(model, tokens, steps, seq_len=SEQ_LEN, lr=lr, seed=seed, on_step=advance)


def _cached(output: Path, make, log) -> Path:
    """`output` as a previous run left it, else made now by `make(output)`. Outputs appear
    atomically, so one that exists is whole."""
    if (output / "bitdelta_config.json").is_file() or (output / "config.json").is_file():
        log(f"reusing {output.name} from the cache")
        return output
    make(output)
    return output


def run_demo(cache: Path | None = None, log=print) -> DemoResult:
    cache = Path(cache or default_cache_dir())
    result = DemoResult()
    start = time.perf_counter()
    base_dir, ft_dir = build_models(cache, log)
    result.seconds["train"] = time.perf_counter() - start

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ft_dir)
    heldout = {
        "prose": tiny.eval_windows(tiny.split(tiny.tokenize(tokenizer, tiny.finetune_text(TEXT_CHARS)))[1], 32, SEQ_LEN),
        "code": tiny.eval_windows(tiny.split(tiny.tokenize(tokenizer, tiny.base_text(TEXT_CHARS)))[1], 32, SEQ_LEN),
    }

    def evaluate(label: str, model) -> None:
        result.rows.append((label, tiny.heldout_loss(model, heldout["prose"]), tiny.heldout_loss(model, heldout["code"])))

    log("measuring held-out losses...")
    evaluate("base", AutoModelForCausalLM.from_pretrained(base_dir))
    evaluate("fine-tune", AutoModelForCausalLM.from_pretrained(ft_dir))
    for granularity in ("matrix", "row"):
        start = time.perf_counter()
        delta_dir = _cached(cache / f"delta-{granularity}", lambda out: compress(base_dir, ft_dir, out, scale=granularity, overwrite=True), log)
        result.seconds[f"compress ({granularity})"] = time.perf_counter() - start
        result.sizes[f"delta ({granularity} scales)"] = DeltaReader(delta_dir).nbytes
        evaluate(f"BitDelta-Initial ({granularity} scales)", load(base_dir, delta_dir))
    start = time.perf_counter()
    log("compressing and distilling the scales (data-free)...")
    distilled_dir = _cached(cache / "delta-distilled", lambda out: compress(base_dir, ft_dir, out, overwrite=True, distill=DEMO_DISTILL), log)
    result.seconds["compress + distill (matrix)"] = time.perf_counter() - start
    evaluate("BitDelta (distilled, matrix scales)", load(base_dir, distilled_dir))
    merged_dir = _cached(cache / "merged-distilled", lambda out: merge(base_dir, distilled_dir, out, overwrite=True), log)
    evaluate("merged checkpoint of the distilled delta", AutoModelForCausalLM.from_pretrained(merged_dir))
    start = time.perf_counter()
    caps_ft = build_second_finetune(cache, base_dir, log)
    caps_delta = _cached(cache / "delta-caps", lambda out: compress(base_dir, caps_ft, out, overwrite=True), log)
    log("serving both fine-tunes in the same batches...")
    result.batch = serve_two_in_one_batch(base_dir, {"prose (distilled)": distilled_dir, "caps": caps_delta})
    result.seconds["second fine-tune + serve both in one batch"] = time.perf_counter() - start
    result.sizes["fine-tune checkpoint"] = _weights_bytes(ft_dir)
    result.sizes["merged checkpoint"] = _weights_bytes(merged_dir)
    return result


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
