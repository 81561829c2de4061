"""Several fine-tunes of one tiny base, served together: for `bitdelta demo`, the tests and the benchmarks.

`make_deltas` turns a base and its fine-tune (bitdelta.tiny or the demo's models) into a deltas
folder of four genuinely different fine-tunes; `serve_two_in_one_batch` answers two of them in the
same batches and checks each answer against its merged model run alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bitdelta import tiny
from bitdelta.compress import compress
from bitdelta.engine import Engine, EngineConfig, EngineObserver, SamplingParams

# The chat-tuned fine-tune speaks its own template, so a server that used the base's would be caught.
ALT_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def make_deltas(base_dir: Path, finetuned_dir: Path, folder: Path, steps: int = 20, seq_len: int = 64, text_chars: int = 300_000) -> dict[str, Path]:
    """Four deltas over `base_dir` in `folder` (reused when present):
    prose-matrix / prose-row: the fine-tune at per-matrix and per-row scales;
    prose-late: another fine-tune of the base, on the second half of the prose;
    code-chat: a fine-tune on more Python source, saved with a chat template of its own."""
    folder = Path(folder)
    deltas = {}
    for scale in ("matrix", "row"):
        deltas[f"prose-{scale}"] = _compressed(base_dir, finetuned_dir, folder / f"prose-{scale}", scale)
    prose, code = tiny.finetune_text(2 * text_chars), tiny.base_text(3 * text_chars)
    for name, text, template, seed in (("prose-late", prose[text_chars:], None, 2), ("code-chat", code[2 * text_chars :], ALT_CHAT_TEMPLATE, 3)):
        finetuned = folder / ".finetunes" / name
        if not (finetuned / "config.json").is_file():
            _finetune(base_dir, text, finetuned, steps, seq_len, template, seed)
        deltas[name] = _compressed(base_dir, finetuned, folder / name, "matrix")
    return deltas


def _compressed(base_dir: Path, finetuned_dir: Path, out: Path, scale: str) -> Path:
    if not (out / "bitdelta_config.json").is_file():
        compress(base_dir, finetuned_dir, out, scale=scale, overwrite=True, progress=False)
    return out


def _finetune(base_dir: Path, text: str, out: Path, steps: int, seq_len: int, chat_template: str | None, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tiny.train(model, tiny.tokenize(tokenizer, text), steps, seq_len=seq_len, lr=1e-3, seed=seed)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tiny._save(model, tokenizer, out)


@dataclass(frozen=True)
class BatchRow:
    model: str
    prompt: str
    served: str  # the engine's greedy answer, in batches shared with the other fine-tune
    alone: str  # the merged fine-tune's own greedy `generate`, run alone in float32
    mixed_steps: int  # forward passes that held rows of both fine-tunes

    @property
    def identical(self) -> bool:
        return self.served == self.alone


class _MixedSteps(EngineObserver):
    def __init__(self) -> None:
        self.count = 0

    def step(self, sequences: int, deltas: int, prefill_tokens: int, decode_tokens: int) -> None:
        self.count += deltas >= 2


def serve_two_in_one_batch(base_dir: Path, delta_dirs: dict[str, Path], prompts: tuple[str, ...] = ("The return value of", "A class is"), max_tokens: int = 24) -> list[BatchRow]:
    """Greedy answers of two fine-tunes computed in the same forward passes, next to each merged
    model's answer alone: the rows must be identical."""
    from bitdelta.apply import load

    if len(delta_dirs) != 2:
        raise ValueError("pass exactly two deltas")
    observer = _MixedSteps()
    engine = Engine(base_dir, EngineConfig(max_batch=8, max_gpu_deltas=2, device="cpu", dtype="float32"), observer)
    for name, path in delta_dirs.items():
        engine.store.register(name, path)
    requests, texts = [], []
    for prompt in prompts:
        for name in delta_dirs:
            tokenizer = engine.store.get(name).tokenizer
            requests.append((name, tokenizer(prompt, add_special_tokens=False)["input_ids"], SamplingParams(max_tokens, temperature=0)))
            texts.append(prompt)
    served = ["".join(o.text for o in outputs) for outputs in engine.generate(requests)]
    engine.stop()
    rows = []
    for name, path in delta_dirs.items():
        merged = load(base_dir, path, dtype="float32")
        tokenizer = engine.store.get(name).tokenizer
        for (model, ids, params), text, answer in zip(requests, texts, served):
            if model == name:
                alone = merged.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                rows.append(BatchRow(name, text, answer, tokenizer.decode(alone[0, len(ids) :], skip_special_tokens=True), observer.count))
    return rows
