"""Sampling parameters, next-token choice, and incremental detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW): greedy, exactly what `generate(do_sample=False)` picks
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # run on through end-of-sequence tokens to max_tokens (vLLM's option; fixed-length load tests)


# Below this temperature, logits / temperature overflows fp32 for ordinary logit gaps (1e-39 is
# a denormal), and the distribution is a point mass on the argmax anyway: such requests are greedy.
GREEDY_BELOW = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token from fp32 logits [vocab]: argmax, or temperature + nucleus (top-p) sampling.
    Defined for every accepted temperature and top_p: the nucleus always keeps the top token."""
    if is_greedy(params):
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p; the first entry is kept explicitly, since
        # a top_p that rounds to 0 in fp32 (1e-300) would otherwise mask every token
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        outside[0] = False
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0))
    if not torch.isfinite(probs).all() or not probs.sum() > 0:
        return int(torch.argmax(logits))  # non-finite logits: the best-scored token, never an exception
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextStream:
    """The text of a growing list of generated tokens, released in pieces that never need taking
    back: an incomplete UTF-8 character and anything that could still become a stop string wait.
    Without a tokenizer (a model served as token ids only) the text stays empty."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string appeared (the text is cut before it)."""
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            return False
        # Decoding the whole list each time is quadratic but always right for byte-level BPE
        # merges across token boundaries; outputs here are at most the context long.
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return False
        search_from = max(len(self.text) - self._holdback, 0)
        self.text = text
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return True
        return False

    def release(self, final: bool) -> str:
        """New text safe to send now (everything that is left, when `final`)."""
        end = len(self.text) if final else max(len(self.text) - self._holdback, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece
