"""Calibration sequences for scale distillation: from a text/JSONL file, a Hugging Face dataset,
or, with no data at all, sampled from the fine-tuned model itself (data-free)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitdelta.errors import DistillationError


def token_windows(tokens: torch.Tensor, count: int, seq_len: int, source: str, seed: int, minimum: int | None = None) -> torch.Tensor:
    """`count` distinct, non-overlapping windows [count, seq_len] drawn reproducibly from a token stream;
    with `minimum`, every window of a shorter stream as long as it has that many."""
    available = len(tokens) // seq_len
    needed = count if minimum is None else minimum
    if available < needed:
        raise DistillationError(
            f"{source} gives {len(tokens):,} tokens, {available} windows of {seq_len}; {needed} are needed "
            "(pass fewer --samples, a shorter --seq-len, more data, or omit --data for data-free calibration)"
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]
    return tokens[: available * seq_len].view(available, seq_len)[order.sort().values]


def read_texts(path: Path) -> list[str]:
    """Texts of a .txt file (one text) or a .jsonl file (fields text, or prompt + completion, per line)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DistillationError(f"cannot read calibration data {path} ({error}); pass a UTF-8 .txt or .jsonl file") from None
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(record["text"] if "text" in record else record["prompt"] + record["completion"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DistillationError(f"{path}:{number} is not a JSON object with a 'text' (or 'prompt' and 'completion') field") from None
    return texts


def hub_texts(dataset_id: str, tokens_needed: int, tokenizer) -> list[str]:
    """Stream texts from a Hugging Face dataset (e.g. allenai/c4 as in the paper) until enough tokens."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DistillationError(f"--data {dataset_id} needs the `datasets` package (pip install datasets), or omit --data for data-free calibration") from None
    name, _, subset = dataset_id.partition(":")
    try:
        stream = load_dataset(name, subset or None, split="train", streaming=True)
        texts, count = [], 0
        for record in stream:
            texts.append(record["text"])
            count += len(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
            if count >= tokens_needed:
                break
        return texts
    except Exception as error:  # network and hub errors come in many classes
        raise DistillationError(
            f"cannot stream dataset {dataset_id} ({type(error).__name__}); check the id and network, "
            "pass a local --data file, or omit --data for data-free calibration"
        ) from None


def tokenize_texts(texts: list[str], tokenizer) -> torch.Tensor:
    """One token stream, each text followed by EOS so windows see document boundaries."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def sample_from_model(model, tokenizer, count: int, seq_len: int, seed: int, batch_size: int = 32) -> torch.Tensor:
    """Data-free calibration: `count` sequences of `seq_len` tokens sampled from the model, from BOS.

    The fine-tune's own samples are the inputs on which its behaviour matters most, and need no
    data set; EOS is suppressed so every sequence has full length.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DistillationError("the tokenizer has neither a BOS nor an EOS token to start data-free sampling from; pass --data")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    batches = []
    for first in range(0, count, batch_size):
        prompt = torch.full((min(batch_size, count - first), 1), start, dtype=torch.long, device=device)
        out = model.generate(
            prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, use_cache=True,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start,
        )
        batches.append(out[:, :seq_len].cpu())
    return torch.cat(batches)


def calibration_sequences(data: str | None, tokenizer, teacher, count: int, seq_len: int, seed: int,
                          minimum: int | None = None) -> tuple[torch.Tensor, str]:
    """[count, seq_len] token ids and a description of where they came from; with `minimum`, fewer
    when a data file is shorter (see token_windows)."""
    if data is None:
        return sample_from_model(teacher, tokenizer, count, seq_len, seed), "data-free (sampled from the fine-tune)"
    path = Path(data).expanduser()
    if path.exists():
        texts = read_texts(path)
        if not texts:
            raise DistillationError(f"calibration data {path} is empty; pass a file with text, or omit --data for data-free calibration")
    elif path.suffix in (".txt", ".jsonl") or data.startswith((".", "/", "~")):
        raise DistillationError(f"calibration data {data}: no such file; pass a .txt/.jsonl file, a dataset id like allenai/c4:en, or omit --data")
    else:
        texts = hub_texts(data, count * seq_len, tokenizer)
    return token_windows(tokenize_texts(texts, tokenizer), count, seq_len, data, seed, minimum), data
