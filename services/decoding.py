"""Token by token: picking the next token (greedy or nucleus sampling) and turning tokens into final text."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is None or 0; else multinomial over the top-p nucleus."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


def make_sampler(sampling: Sampling) -> Callable[[torch.Tensor], int]:
    """Token picker from logits (1, V): argmax, or seeded multinomial over the top-p nucleus."""
    if not sampling.temperature:
        return lambda logits: int(logits.argmax(-1))
    generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else time.time_ns() % 2**63)
    top_p = sampling.top_p or 1.0

    def pick(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits[0].float() / sampling.temperature, dim=-1)  # (V,)
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # tokens after the nucleus is full
        outside[0] = False  # the most likely token always stays, however small top_p rounds
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])

    return pick


class TextAssembler:
    """Incremental detokenisation with stop strings: emits only text that is final."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new final text, whether a stop string ended the text)."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                return self.flush(), True
        if self.text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return "", False
        end = max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta, False

    def flush(self) -> str:
        """Whatever final text has not been emitted yet."""
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta
