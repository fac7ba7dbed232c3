"""The decode loop: tokens from logits over caches, one forward per step, until a stop rule holds.

`RunningBatch` decodes any number of requests together (one forward per step for all of them,
each over its own cache, see `batch`); requests join after their prefill and leave as soon as
they stop. `decode` is the same loop for one request. Generation, evaluation and the service all
decode through it; they differ only in how a token is picked (`greedy`, or the service's
sampler), which tokens end the text, what they do with each token as it comes (`on_token`:
stream it, or stop once an answer is already right) and whether the caller is still waiting
(`live`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection

import torch

from adaptive_kv.batch import BatchCache

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


@dataclass(eq=False)
class DecodingRequest:
    """One request in a running batch: its cache, its next logits, its stop rules and its tokens so far."""

    cache: Any  # a CompressedCache
    logits: torch.Tensor  # (1, V): what the next token is picked from
    max_new_tokens: int
    eos: Collection[int] = ()
    pick: Callable[[torch.Tensor], int] = greedy
    on_token: Callable[[list[int]], bool] | None = None
    live: Callable[[], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    result: Decoded | None = None

    def pick_next(self) -> bool:
        """Pick this step's token; False once the request is done (then `result` says why)."""
        if self.live is not None and not self.live():
            self.result = Decoded(self.tokens, "cancelled")
            return False
        token = self.pick(self.logits)
        self.tokens.append(token)
        if token in self.eos or (self.on_token is not None and self.on_token(self.tokens)):
            self.result = Decoded(self.tokens, "stop")
        elif len(self.tokens) >= self.max_new_tokens:
            self.result = Decoded(self.tokens, "length")
        return self.result is None


class RunningBatch:
    """Requests decoding together, one model forward per step for all that go on.

    A step picks one token for every running request (as `decode` does for one), drops those that
    stop, then runs one forward over the rest. No forward runs after a request's last token.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.running: list[DecodingRequest] = []

    def join(self, cache, first_logits: torch.Tensor, max_new_tokens: int, **rules: Any) -> DecodingRequest:
        """Add a prefilled request whose last logits (1, V) are `first_logits`; it decodes from the next step."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        seq = DecodingRequest(cache, first_logits, max_new_tokens, **rules)
        self.running.append(seq)
        return seq

    @torch.inference_mode()
    def step(self) -> list[DecodingRequest]:
        """One token for every running request; returns the requests that finished in this step."""
        going = [seq for seq in self.running if seq.pick_next()]
        finished = [seq for seq in self.running if seq.result is not None]
        self.running = going
        if going:
            logits = self._forward(going)
            for b, seq in enumerate(going):
                seq.logits = logits[b : b + 1]
        return finished

    def run(self) -> None:
        """Step until no request runs."""
        while self.running:
            self.step()

    def _forward(self, batch: list[DecodingRequest]) -> torch.Tensor:
        """Next-token logits (B, V) of each request after its last picked token."""
        device = batch[0].logits.device
        ids = torch.tensor([[seq.tokens[-1]] for seq in batch], device=device)
        if len(batch) == 1:  # a lone request runs exactly as it would without a batch
            return self.model(ids, cache=batch[0].cache).logits[:, -1]
        cache = BatchCache([seq.cache for seq in batch])
        return self.model(ids, cache=cache, position_ids=cache.positions(device)).logits[:, -1]


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
    """Decode one request after a prefill whose last logits (1, V) are `first_logits`, over `cache`.

    `on_token(tokens)` sees the tokens so far after each one that is not an end token, and
    returns True to stop there. No forward runs after the last token: its logits would go unused.
    """
    batch = RunningBatch(model)
    request = batch.join(cache, first_logits, max_new_tokens, eos=eos, pick=pick, on_token=on_token, live=live)
    batch.run()
    return request.result
