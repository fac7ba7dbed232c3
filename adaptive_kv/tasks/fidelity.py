"""Teacher-forced fidelity samples: natural text, then a continuation to score compressed vs full cache."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.tasks.base import PieceEncoder, TaskSample, haystack_budget, sample_rng
from adaptive_kv.tasks.haystack import prose_paragraphs

_CHARS_PER_TOKEN_GUESS = 4  # a first guess only; the text grows until it has enough tokens


@dataclass(frozen=True)
class FidelityTask:
    """Prose from ``pydoc_data.topics`` at a seeded paragraph: a context, then ``continuation_tokens`` to predict."""

    name: str = "fidelity"
    continuation_tokens: int = 128

    def __post_init__(self) -> None:
        if self.continuation_tokens < 1:
            raise ValueError(f"continuation_tokens={self.continuation_tokens} must be >= 1")

    def build(self, encoder: PieceEncoder, context_length: int, seed: int, index: int) -> TaskSample:
        """``context_length`` tokens of prose plus the next ``continuation_tokens`` (KL / top-1 / perplexity target)."""
        bos = encoder.bos_ids
        haystack_budget(self.name, context_length, len(bos) + 1)
        rng = sample_rng(self.name, seed, index)
        paragraphs = prose_paragraphs()
        start = rng.randrange(len(paragraphs))
        needed = context_length - len(bos) + self.continuation_tokens
        ids = _encode_at_least(encoder, paragraphs[start:] + paragraphs[:start], needed)
        # Tokenised as one string, not piecewise: this is natural text, and no needle must stay whole.
        context_ids = bos + ids[: context_length - len(bos)]
        continuation = ids[context_length - len(bos) : needed]
        metadata = {"start_paragraph": start, "seed": seed, "index": index}
        return TaskSample(self.name, context_ids, (), (), 0, "none", metadata, continuation_ids=continuation)


def _encode_at_least(encoder: PieceEncoder, paragraphs: tuple[str, ...], needed: int) -> tuple[int, ...]:
    """Token ids of the paragraphs joined by blank lines, cycling, with at least ``needed`` tokens."""
    chars = needed * _CHARS_PER_TOKEN_GUESS
    while True:
        text, k = "", 0
        while len(text) < chars:
            # Cycling: contexts beyond the corpus (~50k tokens) reuse it from the start.
            text += paragraphs[k % len(paragraphs)] + "\n\n"
            k += 1
        # verbose=False: exceeding model_max_length is the point here, not a mistake to warn about.
        ids = tuple(encoder.tokenizer.encode(text, add_special_tokens=False, verbose=False))
        if len(ids) >= needed:
            return ids
        chars *= 2
