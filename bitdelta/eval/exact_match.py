"""Generated arithmetic word problems with exact integer answers (GSM8K-like, small), and an
exact-match checker by greedy decoding. The fidelity benchmark fine-tunes on these (loss on the
answer only) and scores every compressed variant by exact match.

    Question: Ana has 23 pears. She buys 17 more and then gives away 5. How many pears does Ana have now?
    Answer: 35<eos>
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NAMES = ("Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mia", "Noor", "Omar", "Pia")
ITEMS = ("apples", "pears", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards", "eggs", "bottles", "boxes")
PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)

    @property
    def completion(self) -> str:
        return f" {self.answer}"


def _one(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.randrange(5)
    if kind == 0:
        return Problem(f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return Problem(f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return Problem(f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that in total?", a * b)
    if kind == 3:
        c = rng.randint(1, min(a + b - 1, 30))
        return Problem(f"{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have now?", a + b - c)
    b, q = rng.randint(2, 9), rng.randint(2, 12)
    return Problem(f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?", q)


def problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` problems, reproducible from `seed` (use different seeds for training and testing)."""
    rng = random.Random(seed)
    return [_one(rng) for _ in range(count)]


def first_integer(text: str) -> int | None:
    """The answer a model gave: the first whitespace-separated token, if it is an integer."""
    words = text.strip().split()
    if not words:
        return None
    try:
        return int(words[0].rstrip(".,"))
    except ValueError:
        return None


@torch.no_grad()
def exact_match(model, tokenizer, items: list[Problem], batch_size: int = 64, max_new_tokens: int = 6) -> float:
    """Share of problems whose greedy answer equals the exact integer answer."""
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right edge
    correct = 0
    try:
        for first in range(0, len(items), batch_size):
            chunk = items[first : first + batch_size]
            encoded = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(first_integer(t.split("\n")[0]) == p.answer for t, p in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
    return correct / len(items)
