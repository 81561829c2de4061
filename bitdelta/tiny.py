"""Tiny, genuinely trained model pairs for the demo, the tests and the benchmarks.

No downloads: the base model learns Python (the standard library's own source), the fine-tune
continues on English prose (the interpreter's bundled documentation, pydoc_data/topics.py), so
every delta here is a real fine-tuning delta, not noise.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "gpt_neox")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. llama: GQA, untied; qwen2: q/k/v biases, tied embeddings; gpt_neox: fused QKV."""

    family: str = "llama"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    vocab: int = 512
    context: int = 128


def base_text(max_chars: int = 2_000_000) -> str:
    """Python source from the standard library, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def finetune_text(max_chars: int = 2_000_000) -> str:
    """English documentation prose shipped with CPython (the help() topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:max_chars]


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE tokenizer trained on `text`, with BOS/EOS/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((text[i : i + 10_000] for i in range(0, len(text), 10_000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(spec: TinySpec, tokenizer, seed: int = 0):
    """A randomly initialised causal LM of the given family (FAMILIES or RECENT_FAMILIES)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny family {spec.family!r}; use one of {', '.join(_FAMILY_CONFIGS)}")
    model_type, extra = _FAMILY_CONFIGS[spec.family]
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    common = dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  max_position_embeddings=spec.context, **ids)
    if model_type != "gpt_neox":
        common["num_key_value_heads"] = max(spec.heads // 2, 1)
    config = AutoConfig.for_model(model_type, **common, **{key: value(spec) if callable(value) else value for key, value in extra.items()})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# family -> (transformers model_type, its own settings; a callable takes the spec)
_FAMILY_CONFIGS = {
    "llama": ("llama", dict(tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "gpt_neox": ("gpt_neox", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True, head_dim=lambda spec: spec.hidden // spec.heads)),
    "gemma3": ("gemma3_text", dict(head_dim=lambda spec: spec.hidden // spec.heads, sliding_window=32,
                             layer_types=lambda spec: ["sliding_attention", "full_attention"] * (spec.layers // 2) + ["sliding_attention"] * (spec.layers % 2))),
    # Gemma 2 with small caps, so that the soft-capping of scores and logits changes the answers
    "gemma2": ("gemma2", dict(head_dim=lambda spec: spec.hidden // spec.heads, query_pre_attn_scalar=lambda spec: spec.hidden // spec.heads,
                              sliding_window=16, attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
    "phi3": ("phi3", dict(tie_word_embeddings=False)),
    "olmo2": ("olmo2", dict(tie_word_embeddings=False)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, head_dim=lambda spec: spec.hidden // spec.heads,
                                    moe_intermediate_size=lambda spec: spec.intermediate // 2, tie_word_embeddings=False)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=lambda spec: spec.hidden // spec.heads, sliding_window=32,
                                tie_word_embeddings=False)),
}
RECENT_FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe", "gpt_oss")  # beside FAMILIES, for their own tests
MOE_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def split(tokens: torch.Tensor, heldout_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(tokens) * (1 - heldout_fraction))
    return tokens[:cut], tokens[cut:]


def train(model, tokens: torch.Tensor, steps: int, batch: int = 16, seq_len: int = 64, lr: float = 3e-3, seed: int = 0,
          on_step: Callable[[str], None] = lambda note: None) -> list[float]:
    """Full-parameter AdamW training on random windows of `tokens`, cosine decay; returns losses.
    `on_step` gets a note (the loss) after every step: a progress bar's `advance`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    device = next(model.parameters()).device
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).to(device)
        # bf16 autocast on a GPU: same recipe, several times faster; the CPU trains in fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=window, labels=window).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        on_step(f"loss {losses[-1]:.3f}")
    model.eval()
    return losses


def eval_windows(tokens: torch.Tensor, count: int = 16, seq_len: int = 64) -> torch.Tensor:
    """Fixed, evenly spaced evaluation windows [count, seq_len]."""
    stride = max((len(tokens) - seq_len) // count, 1)
    return torch.stack([tokens[i * stride : i * stride + seq_len] for i in range(count)])


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    device = next(model.parameters()).device
    losses = [model(input_ids=w.to(device), labels=w.to(device)).loss.item() for w in windows.split(batch)]
    return sum(losses) / len(losses)


def make_pair(
    folder: Path,
    spec: TinySpec = TinySpec(),
    base_steps: int = 40,
    finetune_steps: int = 30,
    text_chars: int = 300_000,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Train a base on Python source, fine-tune a copy on prose, save both; return their dirs."""
    folder = Path(folder)
    base_tokens_text, ft_tokens_text = base_text(text_chars), finetune_text(text_chars)
    tokenizer = train_tokenizer(base_tokens_text, spec.vocab)
    model = build_model(spec, tokenizer, seed)
    seq_len = min(64, spec.context)
    train(model, split(tokenize(tokenizer, base_tokens_text))[0], base_steps, seq_len=seq_len, seed=seed)
    base_dir, ft_dir = folder / f"{spec.family}-base", folder / f"{spec.family}-finetuned"
    _save(model, tokenizer, base_dir)
    train(model, split(tokenize(tokenizer, ft_tokens_text))[0], finetune_steps, seq_len=seq_len, lr=1e-3, seed=seed + 1)
    _save(model, tokenizer, ft_dir)
    return base_dir, ft_dir


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
