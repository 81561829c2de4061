"""`evaluate`: how faithfully a delta (and any baseline) reproduces its fine-tune.

Order of work, one model in memory at a time: check tasks, baselines and the delta; load the
fine-tune, take its logits on the held-out windows (the reference) and its task scores; then the
base, the delta applied to the base, and every baseline, each scored against the reference.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bitdelta.device import DTYPES
from bitdelta.device import resolve_device
from bitdelta.errors import DistillationError, EvaluationError
from bitdelta.eval import baselines as bl
from bitdelta.eval.metrics import Reference, fidelity, gain_kept, reference


def resolve_dtype(name: str, finetuned_config: dict) -> torch.dtype:
    """'auto' is the fine-tune's own dtype (as its config.json states it; fp32 if unstated)."""
    if name == "auto":
        name = finetuned_config.get("dtype") or finetuned_config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise EvaluationError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def heldout_windows(data: str | None, tokenizer, finetuned, count: int, seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    """[count, seq_len] evaluation windows from a .txt/.jsonl file or hub dataset id, or sampled
    from the fine-tune when no data is given (then perplexity favours the fine-tune by design)."""
    from bitdelta.calibration import calibration_sequences

    try:
        return calibration_sequences(data, tokenizer, finetuned, count, seq_len, seed)
    except DistillationError as error:  # shared loader; its messages speak of calibration and --samples
        message = str(error).replace("calibration data", "evaluation data").replace("--samples", "--windows")
        raise EvaluationError(message.replace("omit --data for data-free calibration", "omit --data to sample from the fine-tune")) from None


def evaluate(
    base: str | Path,
    finetuned: str | Path,
    delta: str | Path | None = None,
    *,
    data: str | None = None,
    tasks: Sequence[str] = (),
    baselines: Sequence[str] = (),
    include_path: str | Path | None = None,
    windows: int = 32,
    seq_len: int = 256,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    base_quant: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Score base, fine-tune, base + `delta` and each baseline (see bitdelta.eval.SPECS)
    against the fine-tune: held-out loss and perplexity, logit MSE, KL(fine-tune || model), top-1
    agreement, and lm-eval task metrics for `tasks`; plus the share of the fine-tune's gain over
    the base each keeps. With `base_quant` (a bitdelta.quant recipe), the base quantized by it is
    scored too ("base-RECIPE"), and `delta` must have been made over it. Returns a JSON-ready dict
    with one row per model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitdelta.apply import load, open_pair, quantized_base_model
    from bitdelta.checkpoint import Checkpoint
    from bitdelta.eval.harness import prepare_tasks, run_tasks

    log = log or (lambda _: None)
    methods = [bl.parse(spec) for spec in baselines]
    if delta is None and not methods:
        raise EvaluationError("nothing to evaluate: pass --delta DELTA and/or --baseline METHOD")
    task_set = prepare_tasks(list(tasks), include_path) if tasks else None
    if delta is not None:
        _, reader = open_pair(base, delta)  # a missing, corrupted or foreign delta fails now, not after the fine-tune ran
        if reader.config.base_recipe != base_quant:
            made = f"--base-quant {reader.config.base_recipe}" if reader.config.base_recipe else "no --base-quant"
            raise EvaluationError(f"{delta} was compressed with {made}; evaluate it with the same")
    ft_ckpt = Checkpoint(finetuned)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype, ft_ckpt.config)
    tokenizer = AutoTokenizer.from_pretrained(ft_ckpt.path)
    seq_len = min(seq_len, ft_ckpt.config.get("max_position_embeddings", seq_len))

    rows: list[dict] = []

    def score(label: str, model, ref: Reference, extra: dict | None = None) -> None:
        row = dict(model=label, **(extra or {}), **fidelity(model, ref))
        if task_set is not None:
            row["tasks"] = run_tasks(model, tokenizer, task_set, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot, seed=seed)
        rows.append(row)
        log(f"{label}: loss {row['loss']:.4f}, KL {row['kl']:.4g}, top-1 {row['top1']:.3f}" + (f", tasks {row['tasks']}" if "tasks" in row else ""))

    teacher = AutoModelForCausalLM.from_pretrained(ft_ckpt.path, dtype=torch_dtype).to(torch_device).eval()
    ids, source = heldout_windows(data, tokenizer, teacher, windows, seq_len, seed)
    ref = reference(teacher, ids, batch_size)
    score("fine-tune", teacher, ref)
    del teacher
    _release()
    score("base", AutoModelForCausalLM.from_pretrained(Checkpoint(base).path, dtype=torch_dtype).to(torch_device).eval(), ref)
    _release()
    if base_quant is not None:
        score(f"base-{base_quant}", quantized_base_model(base, base_quant, torch_dtype).to(torch_device).eval(), ref)
        _release()
    if delta is not None:
        score("delta", load(base, delta, dtype=str(torch_dtype).removeprefix("torch."), device=torch_device), ref, dict(path=str(delta)))
        _release()
    if methods:
        approximator = bl.Approximator(base, finetuned, torch_device, torch_dtype)
        for method in methods:
            bits = approximator.storage_bits(method) / approximator.weights
            score(method.name, approximator.build(method), ref, dict(bits_per_weight=bits))
        del approximator
        _release()
    _add_gains(rows)
    return dict(base=str(base), finetuned=str(finetuned), delta=None if delta is None else str(delta), data=source,
                windows=len(ids), seq_len=ids.shape[1], device=str(torch_device), dtype=str(torch_dtype).removeprefix("torch."),
                tasks=list(tasks), rows=rows)


def _add_gains(rows: list[dict]) -> None:
    """gain_kept per row: for held-out loss and for every task metric, relative to base and fine-tune."""
    finetuned, base = rows[0], rows[1]
    for row in rows:
        gains = {"loss": gain_kept(row["loss"], base["loss"], finetuned["loss"])}
        for task, metrics in row.get("tasks", {}).items():
            for metric, value in metrics.items():
                gains[f"{task}/{metric}"] = gain_kept(value, base["tasks"][task][metric], finetuned["tasks"][task][metric])
        row["gain_kept"] = gains


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
