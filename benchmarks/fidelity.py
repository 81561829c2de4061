"""Fidelity of BitDelta and its baselines on genuinely trained Llama pairs at three sizes (issue 4):
the paper's tables (base / fine-tune / BitDelta-Initial / BitDelta / SVD / k-bit deltas / BitDelta
over INT8, FP8 and INT4 bases, Initial and distilled) at small scale.

    python -m benchmarks.fidelity --sizes 15m,50m --device cuda                     # one H100, < 10 min
    python -m benchmarks.fidelity --sizes 150m --device cuda --suffix _150m        # one H100, < 10 min
    python -m benchmarks.fidelity --sizes micro --steps-scale 0.05 --results /tmp/fidelity   # CPU smoke test

Per size: a base pretrained on Python source (the standard library), and three fine-tunes of it:
  sft     full-parameter SFT on generated arithmetic word problems (loss on the answer tokens only),
          scored by exact match of the greedy answer on held-out problems;
  domain  full-parameter continued pretraining on English prose (the pydoc topics);
  lora    a rank-16 LoRA on every block linear, trained on the same SFT task, merged into the weights.
Checkpoints are saved in bf16 like released ones; every variant is then evaluated in fp32.
Nothing is committed but the results: the script rebuilds the models (a time cap per training phase
keeps the GPU run bounded; the steps actually run are recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from bitdelta import compress, distill, load, tiny
from bitdelta.distill import DistillConfig
from bitdelta.eval import baselines as bl
from bitdelta.eval.exact_match import exact_match, problems
from bitdelta.eval.metrics import fidelity, gain_kept, reference
from bitdelta.quant import RECIPES

RESULTS = Path(__file__).parent / "results"
SIZES = {  # Llama, GQA (kv heads = heads / 2), untied embeddings, vocab 8192
    "micro": tiny.TinySpec(hidden=64, layers=2, heads=4, intermediate=192, vocab=1024, context=128),
    "15m": tiny.TinySpec(hidden=256, layers=12, heads=4, intermediate=768, vocab=8192, context=256),
    "50m": tiny.TinySpec(hidden=512, layers=12, heads=8, intermediate=1536, vocab=8192, context=256),
    "150m": tiny.TinySpec(hidden=1024, layers=12, heads=16, intermediate=2816, vocab=8192, context=256),
}
# steps, lr and a wall-clock cap (seconds) per phase and size; --steps-scale multiplies steps
PLAN = {
    "base": dict(steps=600, lr={"micro": 3e-3, "15m": 2e-3, "50m": 1e-3, "150m": 6e-4}, cap={"15m": 20, "50m": 30, "150m": 50}),
    "sft": dict(steps=400, lr={"micro": 1e-3, "15m": 4e-4, "50m": 3e-4, "150m": 2e-4}, cap={"15m": 12, "50m": 12, "150m": 15}),
    "domain": dict(steps=100, lr={"micro": 3e-4, "15m": 1e-4, "50m": 1e-4, "150m": 1e-4}, cap={"15m": 6, "50m": 8, "150m": 10}),
    "lora": dict(steps=400, lr={"micro": 3e-3, "15m": 2e-3, "50m": 1.5e-3, "150m": 1e-3}, cap={"15m": 10, "50m": 12, "150m": 15}),
}
LORA_RANK, LORA_ALPHA = 16, 32
SVD_RANKS = (16, 64, 128)
RTN_BITS = (2, 3, 4, 5, 6, 8)
DISTILL = dict(samples=400, seq_len=128, steps=200, lr=1e-4, batch_size=4, heldout=16)  # the paper's recipe, fewer samples


# ---------------------------------------------------------------- data

def train_tokenizer(code: str, prose: str, vocab: int):
    """Byte-level BPE like bitdelta.tiny's, but digits split one by one (as Llama's tokenizer does),
    so arithmetic is learnable digit by digit. Trained on code, prose and problems alike."""
    text = code[:1_500_000] + prose[:300_000] + "\n".join(p.prompt + p.completion for p in problems(3000, seed=99))
    tokenizer = _retrain_with_digits(text, vocab)
    tokenizer.chat_template = tiny.CHAT_TEMPLATE
    return tokenizer


def _retrain_with_digits(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text[i : i + 10_000] for i in range(0, len(text), 10_000)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2])


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    chunks = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
    ids = tokenizer(chunks, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for chunk in ids for t in chunk], dtype=torch.long)


def sft_tensors(tokenizer, items) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [prompt answer EOS] rows and labels that score only the answer and EOS."""
    prompts = tokenizer([p.prompt for p in items], add_special_tokens=False)["input_ids"]
    answers = tokenizer([p.completion for p in items], add_special_tokens=False)["input_ids"]
    rows = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :])
    return ids, labels


class Data:
    """Everything the pairs train and are evaluated on, tokenized once per run."""

    def __init__(self, tokenizer, scale: float, seed: int = 0):
        code, prose = tiny.base_text(10**9), tiny.finetune_text(10**9)
        self.code_train, self.code_test = tiny.split(tokenize_stream(tokenizer, code))
        self.prose_train, self.prose_test = tiny.split(tokenize_stream(tokenizer, prose))
        train_items = problems(max(int(40_000 * scale), 2000), seed=seed + 1)
        seen = {p.question for p in train_items}
        self.test_problems = [p for p in problems(700, seed=seed + 2) if p.question not in seen][:512]
        self.sft_ids, self.sft_labels = sft_tensors(tokenizer, train_items)
        self.train_problems = train_items
        test_text = "".join(p.prompt + p.completion + tokenizer.eos_token for p in self.test_problems)
        self.problem_test_stream = tokenize_stream(tokenizer, test_text)


# ---------------------------------------------------------------- training

def fit(model, batches, steps: int, lr: float, cap_s: float | None, params=None, label: str = "") -> dict:
    """AdamW with warmup and cosine decay; the schedule follows whichever ends first, the steps or
    the time cap, so a capped phase still anneals. bf16 autocast on CUDA."""
    device = next(model.parameters()).device
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if label == "lora" else 0.01, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(zlib.crc32(label.encode()))  # str hash() is salted per process
    model.train()
    start, losses, step = time.perf_counter(), [], 0
    while step < steps:
        progress = max(step / steps, (time.perf_counter() - start) / cap_s if cap_s else 0.0)
        if progress >= 1:
            break
        warm = min(1.0, (step + 1) / max(steps // 20, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        ids, labels = batches(generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item()) if step % 10 == 0 else None
        step += 1
    model.eval()
    seconds = time.perf_counter() - start
    print(f"  {label}: {step}/{steps} steps in {seconds:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return dict(steps=step, planned_steps=steps, seconds=round(seconds, 1), lr=lr, first_loss=losses[0], last_loss=losses[-1])


def lm_batches(tokens: torch.Tensor, batch: int, seq_len: int):
    def draw(generator):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        return window, window
    return draw


def sft_batches(ids: torch.Tensor, labels: torch.Tensor, batch: int):
    def draw(generator):
        pick = torch.randint(0, len(ids), (batch,), generator=generator)
        return ids[pick], labels[pick]
    return draw


class LoRALinear(nn.Module):
    """W x + (alpha / r) B A x with A, B trainable and W frozen (Hu et al. 2021); B starts at 0."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear, self.scaling = linear, alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, linear.in_features, device=linear.weight.device) / math.sqrt(linear.in_features))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))

    def forward(self, x):
        return self.linear(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.linear.weight += (self.lora_b @ self.lora_a * self.scaling).to(self.linear.weight.dtype)
        return self.linear


def lora_finetune(model, batches, steps, lr, cap) -> dict:
    from bitdelta.nn import replace_linear

    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for name in names:
        replace_linear(model, name, LoRALinear(model.get_submodule(name), LORA_RANK, LORA_ALPHA))
    record = fit(model, batches, steps, lr, cap, label="lora")
    for name in names:
        replace_linear(model, name, model.get_submodule(name).merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return record | dict(rank=LORA_RANK, alpha=LORA_ALPHA, modules=len(names))


def save_bf16(model, tokenizer, folder: Path) -> None:
    """Save in bf16 like a released checkpoint and continue from exactly those weights."""
    model.to(torch.bfloat16)
    tiny._save(model, tokenizer, folder)
    model.float()


def build_pairs(size: str, tokenizer, data: Data, work: Path, device: str, scale: float, record: dict) -> dict[str, Path]:
    spec = SIZES[size]
    steps = {phase: max(int(PLAN[phase]["steps"] * scale), 2) for phase in PLAN}
    lr = {phase: PLAN[phase]["lr"][size] for phase in PLAN}
    cap = {phase: PLAN[phase]["cap"].get(size) for phase in PLAN}
    seq = min(256, spec.context)
    model = tiny.build_model(spec, tokenizer).to(device)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    print(f"{size}: {record['parameters'] / 1e6:.1f}M parameters", flush=True)
    record["training"] = {"base": fit(model, lm_batches(data.code_train, 32, seq), steps["base"], lr["base"], cap["base"], label="base")}
    dirs = {"base": work / "base"}
    save_bf16(model, tokenizer, dirs["base"])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    jobs = {
        "sft": lambda m: fit(m, sft_batches(data.sft_ids, data.sft_labels, 64), steps["sft"], lr["sft"], cap["sft"], label="sft"),
        "domain": lambda m: fit(m, lm_batches(data.prose_train, 32, seq), steps["domain"], lr["domain"], cap["domain"], label="domain"),
        "lora": lambda m: lora_finetune(m, sft_batches(data.sft_ids, data.sft_labels, 64), steps["lora"], lr["lora"], cap["lora"]),
    }
    for pair, job in jobs.items():
        model.load_state_dict(initial)
        record["training"][pair] = job(model)
        dirs[pair] = work / pair
        save_bf16(model, tokenizer, dirs[pair])
    return dirs


# ---------------------------------------------------------------- evaluation

def variants() -> list[tuple[str, object]]:
    """(label, method) in table order; None methods are handled separately."""
    rows = [("base", None), ("fine-tune", None), ("BitDelta-Initial", bl.OneBit()), ("BitDelta", None), ("SVD equal storage", bl.SVD(None))]
    rows += [(f"SVD r={r}", bl.SVD(r)) for r in sorted(SVD_RANKS, reverse=True)]  # largest first: one decomposition
    rows += [(f"{k}-bit RTN delta", bl.RTN(k)) for k in RTN_BITS]
    rows += [(f"BitDelta-Initial over {recipe.upper()} base", bl.OverQuantizedBase(recipe)) for recipe in RECIPES]
    rows += [(distilled_label(recipe), None) for recipe in RECIPES]
    return rows


def distilled_label(recipe: str | None) -> str:
    """The row of the distilled delta over the base, or over the base quantized by `recipe`."""
    return "BitDelta" if recipe is None else f"BitDelta over {recipe.upper()} base"


def evaluate_pair(pair: str, dirs: dict[str, Path], tokenizer, data: Data, work: Path, device: str, n_problems: int, n_windows: int) -> dict:
    from transformers import AutoModelForCausalLM

    arithmetic = pair in ("sft", "lora")
    stream = data.problem_test_stream if arithmetic else data.prose_test
    windows = tiny.eval_windows(stream, n_windows, 128)
    approx = bl.Approximator(dirs["base"], dirs[pair], device)
    ref = reference(approx.build(None), windows, batch_size=16)
    test = data.test_problems[:n_problems]

    calib = work / f"calib-{pair}.txt"
    calib.write_text("\n".join(p.prompt + p.completion for p in data.train_problems[:4000]) if arithmetic
                     else tokenizer.decode(data.prose_train[:200_000]))
    deltas, distill_records = {}, {}
    for recipe in (None, *RECIPES):  # the distilled delta over the base and over each quantized base
        label, start = distilled_label(recipe), time.perf_counter()
        deltas[label] = compress(dirs["base"], dirs[pair], work / f"delta-{pair}-{recipe or 'fp'}", overwrite=True, progress=False, base_quant=recipe)
        record = distill(dirs["base"], dirs[pair], deltas[label], DistillConfig(data=str(calib), device=device, **DISTILL), progress=False)
        distill_records[label] = dict(seconds=round(time.perf_counter() - start, 1), **{k: record[k] for k in ("heldout_before", "heldout_after", "data")})

    rows = []
    for label, method in variants():
        if label == "base":
            model = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32).to(device).eval()
        elif label == "fine-tune":
            model = approx.build(None)
        elif label in deltas:
            model = load(dirs["base"], deltas[label], dtype="float32", device=device)
        else:
            model = approx.build(method)
        row = dict(variant=label, **fidelity(model, ref))
        if method is not None or label in deltas:
            m = method or bl.OneBit()
            row["bits_per_weight"] = approx.storage_bits(m) / approx.weights
            row["weight_error"] = _weight_error(approx, m, model)
        elif label == "fine-tune":
            row["bits_per_weight"] = 16.0
        if arithmetic:
            row["exact_match"] = exact_match(model, tokenizer, test, batch_size=128)
        rows.append(row)
        del model
    base, ft = rows[0], rows[1]
    for row in rows:
        row["gain_kept_loss"] = gain_kept(row["loss"], base["loss"], ft["loss"])
        if arithmetic:
            row["gain_kept_exact_match"] = gain_kept(row["exact_match"], base["exact_match"], ft["exact_match"])
        row["gain_kept"] = row["gain_kept_exact_match"] if arithmetic else row["gain_kept_loss"]
    spectrum = _spectrum(approx)
    del approx
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(pair=pair, primary_metric="exact match" if arithmetic else "held-out prose loss", heldout=f"{n_windows} x 128 tokens",
                problems=len(test) if arithmetic else None, distillation=distill_records,
                spectrum=spectrum, rows=rows)


@torch.no_grad()
def _weight_error(approx: bl.Approximator, method, model) -> float:
    """Relative squared Frobenius error of the compressible matrices: ||W_approx - W_ft||^2 / ||W_ft - W_base||^2."""
    error = total = 0.0
    for name in approx.names:
        w = model.get_parameter(name).detach().float()
        ft, base = approx.finetuned[name].to(w.device).float(), approx.base[name].to(w.device).float()
        error += (w - ft).pow(2).sum().item()
        total += (ft - base).pow(2).sum().item()
    return error / total


@torch.no_grad()
def _spectrum(approx: bl.Approximator) -> dict:
    """Why SVD wins or loses: the share of the delta's energy ||D||^2 in its top singular values at
    the equal-storage rank and at r=16, against the share a 1-bit sign delta captures,
    ||mean|D| sign D||^2 = mean|D|^2 N K (its error is ||D||^2 minus that). Uses the SVD factors
    the SVD rows cached (U_R S_R: column norms are the singular values)."""
    kept_equal = kept_16 = kept_sign = total = 0.0
    for name in approx.names:
        delta = approx.finetuned[name].float() - approx.base[name].float()
        rank = bl.SVD(None).rank_for(*delta.shape)
        left, _ = approx._svd(name, max(rank, 16), "cpu")
        s2 = left.pow(2).sum(0)
        kept_equal += s2[:rank].sum().item()
        kept_16 += s2[:16].sum().item()
        kept_sign += delta.abs().mean().pow(2).item() * delta.numel()
        total += delta.pow(2).sum().item()
    return dict(energy_top_r_equal=kept_equal / total, energy_top_16=kept_16 / total, energy_sign_1bit=kept_sign / total)


# ---------------------------------------------------------------- reporting

def markdown(result: dict) -> str:
    lines = [f"# Fidelity of BitDelta and baselines on small Llama pairs ({result['hardware']})", "",
             f"Reproduce: `{result['command']}`", "",
             "Base: pretrained on Python source. Fine-tunes: **sft** (full fine-tune on arithmetic word problems, "
             "exact-match scored), **domain** (continued pretraining on English prose), **lora** (rank-16 LoRA on the same SFT task, merged). "
             "Checkpoints bf16, evaluation fp32. *ppl*: held-out perplexity on the fine-tune's own domain (test problems or prose); "
             "*EM*: exact match on held-out problems; *KL*: KL(fine-tune ‖ variant) per token; *bits*: delta bits per compressible weight "
             "(block linears; everything else is stored losslessly by every method). *Gain kept*: share of the fine-tune's improvement over the "
             "base (EM for sft/lora, held-out loss for domain).", ""]
    if result.get("note"):
        lines += [f"**{result['note']}**", ""]
    lines += ["## Goal: BitDelta keeps >= 95% of the gain and beats SVD at equal storage", "",
              "| size | pair | base → fine-tune | BitDelta-Initial | BitDelta | SVD equal storage | 2-bit RTN | ≥95%? | beats SVD? |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for size in result["sizes"]:
        for pair in size["pairs"]:
            r = {row["variant"]: row for row in pair["rows"]}
            metric = "exact_match" if pair["primary_metric"] == "exact match" else "ppl"
            span = f"{metric.replace('_', ' ')} {_fmt(r['base'][metric])} → {_fmt(r['fine-tune'][metric])}"
            bd, svd = r["BitDelta"]["gain_kept"], r["SVD equal storage"]["gain_kept"]
            met = "n/a" if bd is None else ("yes" if bd >= 0.95 else "**no**")
            beats = "n/a" if bd is None or svd is None else ("yes" if bd > svd else ("tie" if bd == svd else "**no**"))
            lines.append(f"| {size['size']} | {pair['pair']} | {span} | {_pct(r['BitDelta-Initial']['gain_kept'])} | {_pct(bd)} | {_pct(svd)} | "
                         f"{_pct(r['2-bit RTN delta']['gain_kept'])} | {met} | {beats} |")
    lines += ["", "## Goal: over an INT8 or FP8 base, the distilled delta keeps the gain within 1 point of the fp16 base's", "",
              "Gain kept by the delta over the base and over the base quantized (`compress --base-quant`), Initial / distilled.", "",
              "| size | pair | fp16 base | " + " | ".join(f"{r.upper()} base" for r in RECIPES) + " | INT8, FP8 within 1 point? |",
              "| --- | --- | ---: |" + " ---: |" * len(RECIPES) + " --- |"]
    for size in result["sizes"]:
        for pair in size["pairs"]:
            r = {row["variant"]: row["gain_kept"] for row in pair["rows"]}
            cells = [f"{_pct(r['BitDelta-Initial'])} / {_pct(r['BitDelta'])}"]
            cells += [f"{_pct(r[f'BitDelta-Initial over {q.upper()} base'])} / {_pct(r[distilled_label(q)])}" for q in RECIPES]
            kept = [r[distilled_label(q)] for q in ("int8", "fp8")]
            met = "n/a" if r["BitDelta"] is None or None in kept else ("yes" if min(kept) >= r["BitDelta"] - 0.01 else "**no**")
            lines.append(f"| {size['size']} | {pair['pair']} | " + " | ".join(cells) + f" | {met} |")
    for size in result["sizes"]:
        lines += ["", f"## {size['size']}: {size['parameters'] / 1e6:.1f}M parameters", ""]
        pairs = size["pairs"]
        header = ["variant", "bits"]
        for pair in pairs:
            p = pair["pair"]
            header += [f"{p} ppl"] + ([f"{p} EM"] if pair["primary_metric"] == "exact match" else []) + [f"{p} KL", f"{p} gain kept"]
        lines += ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        for i, (label, _) in enumerate(variants()):
            bits = pairs[0]["rows"][i].get("bits_per_weight")
            cells = [label, "" if bits is None else f"{bits:.3g}"]
            for pair in pairs:
                row = pair["rows"][i]
                cells += [f"{row['ppl']:.3f}"] + ([f"{row['exact_match']:.1%}"] if "exact_match" in row else []) + [f"{row['kl']:.3g}", _pct(row["gain_kept"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Delta energy captured (why SVD wins or loses): " + "; ".join(
            f"{p['pair']}: top-r at equal storage {p['spectrum']['energy_top_r_equal']:.1%}, top-16 {p['spectrum']['energy_top_16']:.1%}, "
            f"1-bit sign {p['spectrum']['energy_sign_1bit']:.1%}" for p in pairs),
            "", "Training: " + "; ".join(f"{k} {v['steps']}/{v['planned_steps']} steps, {v['seconds']} s, loss {v['first_loss']:.2f}→{v['last_loss']:.2f}"
                                         for k, v in size["training"].items())]
    lines += ["", f"![accuracy against delta bits per weight](fidelity{result['suffix']}_bits.png)"]
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return f"{value:.1%}" if value <= 1 else f"{value:.2f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def plot(result: dict, path: Path) -> None:
    """Exact match (sft, lora) and gain kept (all pairs) against delta bits per weight, one column per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 8), squeeze=False)
    for col, size in enumerate(sizes):
        for pair in size["pairs"]:
            r = {row["variant"]: row for row in pair["rows"]}
            ladder = [r["BitDelta-Initial"]] + [r[f"{k}-bit RTN delta"] for k in RTN_BITS]
            svd = [r["SVD equal storage"]] + [r[f"SVD r={k}"] for k in sorted(SVD_RANKS)]
            for row_i, key in ((0, "exact_match"), (1, "gain_kept")):
                if key not in r["BitDelta"] or r["BitDelta"][key] is None:
                    continue
                ax = axes[row_i][col]
                line, = ax.plot([x["bits_per_weight"] for x in ladder], [x[key] for x in ladder], "o-", label=f"{pair['pair']}: 1-bit sign, then k-bit RTN")
                ax.plot([x["bits_per_weight"] for x in svd], [x[key] for x in svd], "s--", color=line.get_color(), alpha=0.6, label=f"{pair['pair']}: SVD (equal, 16, 64, 128)")
                ax.plot([r["BitDelta"]["bits_per_weight"]], [r["BitDelta"][key]], "*", ms=14, color=line.get_color(), label=f"{pair['pair']}: BitDelta (distilled)")
                ax.axhline(r["fine-tune"][key], color=line.get_color(), lw=0.8, ls=":")
                if key == "exact_match":
                    ax.axhline(r["base"][key], color=line.get_color(), lw=0.8, ls="-.")
        for row_i, ylabel in ((0, "exact match (dotted: fine-tune, dash-dot: base)"), (1, "share of the fine-tune's gain kept")):
            ax = axes[row_i][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("delta bits per compressible weight")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{size['size']} ({size['parameters'] / 1e6:.0f}M)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = result["suffix"]
    (folder / f"fidelity{suffix}.json").write_text(json.dumps(result, indent=2))
    (folder / f"fidelity{suffix}.md").write_text(markdown(result))
    try:
        plot(result, folder / f"fidelity{suffix}_bits.png")
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", flush=True)
    except Exception as error:  # a plotting bug must not cost the numbers
        print(f"plot failed: {type(error).__name__}: {error}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="15m,50m,150m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--problems", type=int, default=512, help="held-out problems for exact match")
    parser.add_argument("--windows", type=int, default=32, help="held-out 128-token windows for ppl and KL")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bitdelta-fidelity"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--suffix", default="", help="results file names: fidelity<suffix>.json/.md, fidelity<suffix>_bits.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fidelity numbers in true fp32; training uses bf16 autocast anyway
    start = time.perf_counter()
    sizes = args.sizes.split(",")
    command = "python -m benchmarks.fidelity " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("sizes", args.sizes), ("device", args.device), ("steps_scale", args.steps_scale),
                                                    ("problems", args.problems), ("windows", args.windows)) if v is not None)
    code, prose = tiny.base_text(10**9), tiny.finetune_text(10**9)
    vocab = max(SIZES[s].vocab for s in sizes)
    tokenizer = train_tokenizer(code, prose, vocab)
    data = Data(tokenizer, args.steps_scale)
    print(f"data ready in {time.perf_counter() - start:.0f} s: {len(data.code_train):,} code tokens, {len(data.prose_train):,} prose tokens, "
          f"{len(data.sft_ids):,} training problems", flush=True)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    result = dict(command=command, hardware=gpu or "CPU", device=args.device, steps_scale=args.steps_scale, suffix=args.suffix,
                  note=None if args.steps_scale >= 1 else f"Smoke-test scale (--steps-scale {args.steps_scale}): not the reproduction.",
                  settings=dict(plan=PLAN, lora_rank=LORA_RANK, distill=DISTILL, svd_ranks=SVD_RANKS, rtn_bits=RTN_BITS), sizes=[])
    for size in sizes:
        work = args.workdir / size
        shutil.rmtree(work, ignore_errors=True)
        record = dict(size=size, spec=vars(SIZES[size]))
        dirs = build_pairs(size, tokenizer, data, work, args.device, args.steps_scale, record)
        record["pairs"] = []
        for pair in ("sft", "domain", "lora"):
            t = time.perf_counter()
            record["pairs"].append(evaluate_pair(pair, dirs, tokenizer, data, work, args.device, args.problems, args.windows))
            rows = {r["variant"]: r for r in record["pairs"][-1]["rows"]}
            print(f"  {size}/{pair} evaluated in {time.perf_counter() - t:.0f} s: gain kept BitDelta-Initial {_pct(rows['BitDelta-Initial']['gain_kept'])}, "
                  f"BitDelta {_pct(rows['BitDelta']['gain_kept'])}, SVD equal {_pct(rows['SVD equal storage']['gain_kept'])}", flush=True)
        result["sizes"].append(record)
        result["seconds"] = round(time.perf_counter() - start, 1)
        write(result, args.results)  # partial results survive a timeout
        print(f"{size} done at {result['seconds']} s", flush=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
