"""The decode loop: tokens from logits over a cache, one forward per token, until a stop rule holds.

Generation, evaluation and the service all decode through `decode`; they differ only in how a
token is picked (`greedy`, or the service's sampler), which tokens end the text, what they do with
each token as it comes (`on_token`: stream it, or stop once an answer is already right) and
whether the caller is still waiting (`live`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import torch

FINISH_REASONS = ("stop", "length", "cancelled")


def greedy(logits: torch.Tensor) -> int:
    """The most likely token of logits (1, V)."""
    return int(logits.argmax(-1))


def end_tokens(model, tokenizer=None) -> frozenset[int]:
    """End-of-sequence ids of the model's generation config (what transformers' generate stops on),
    and the tokenizer's when one is given."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    if tokenizer is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)


@dataclass(frozen=True)
class Decoded:
    """The tokens picked (an end token that stopped the loop included) and why the loop ended.

    `finish`: "stop" (an end token, or `on_token` asked to stop), "length" (`max_new_tokens`
    reached) or "cancelled" (`live()` turned false first).
    """

    tokens: list[int]
    finish: str


@torch.inference_mode()
def decode(
    model,
    cache,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    *,
    eos: Collection[int] = (),
    pick: Callable[[torch.Tensor], int] = greedy,
    on_token: Callable[[list[int]], bool] | None = None,
    live: Callable[[], bool] | None = None,
) -> Decoded:
    """Decode after a prefill whose last logits (1, V) are `first_logits`, over `cache`.

    `on_token(tokens)` sees the tokens so far after each one that is not an end token, and
    returns True to stop there. No forward runs after the last token: its logits would go unused.
    """
    tokens: list[int] = []
    logits = first_logits
    while len(tokens) < max_new_tokens:
        if live is not None and not live():
            return Decoded(tokens, "cancelled")
        token = pick(logits)
        tokens.append(token)
        if token in eos or (on_token is not None and on_token(tokens)):
            return Decoded(tokens, "stop")
        if len(tokens) < max_new_tokens:
            logits = model(torch.tensor([[token]], device=first_logits.device), cache=cache).logits[:, -1]
    return Decoded(tokens, "length")
