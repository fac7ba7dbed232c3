"""Passkey retrieval in the Landmark attention format (Mohtashami & Jaggi, 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.tasks import haystack as hs
from adaptive_kv.tasks.base import Piece, PieceEncoder, TaskSample, assemble, haystack_budget, pieces_length, sample_rng

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
INFO_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# Depth of the key line as a percentage of the garbage; the seed picks one per sample.
DEPTHS = tuple(range(0, 101, 10))


@dataclass(frozen=True)
class PasskeyTask:
    """Landmark attention passkey: a 5-digit key hidden in repeated garbage at a seeded depth."""

    name: str = "passkey"
    key_digits: int = 5
    max_new_tokens: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.key_digits <= 12:
            raise ValueError(f"key_digits={self.key_digits} must be in [1, 12]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")

    def build(self, encoder: PieceEncoder, context_length: int, seed: int, index: int) -> TaskSample:
        """Landmark attention's five lines joined by newlines, with exactly ``context_length`` tokens."""
        rng = sample_rng(self.name, seed, index)
        key = str(rng.randint(10 ** (self.key_digits - 1), 10**self.key_digits - 1))
        depth = rng.choice(DEPTHS)
        head = [Piece(encoder.bos_ids), encoder.piece(INTRO + "\n")]
        info = [encoder.piece("\n" + INFO_LINE.format(key=key) + "\n", is_needle=True)]
        tail = [encoder.piece("\n")]
        question_ids = encoder.encode(QUESTION)
        fixed = pieces_length(head + info + tail) + len(question_ids)
        budget = haystack_budget(self.name, context_length, fixed)
        # Landmark slices one long garbage string at the depth; here each side is filled token-exactly.
        prefix_budget = round(budget * depth / 100)
        prefix, prefix_pad = hs.fill(encoder, hs.unit_texts("repeat", rng, " "), prefix_budget)
        suffix, suffix_pad = hs.fill(encoder, hs.unit_texts("repeat", rng, " "), budget - prefix_budget)
        pieces = head + hs.with_pad(prefix, prefix_pad) + info + hs.with_pad(suffix, suffix_pad) + tail
        context_ids, spans = assemble(pieces)
        metadata = {"depth": depth, "needle_spans": spans, "seed": seed, "index": index}
        return TaskSample(self.name, context_ids, question_ids, (key,), self.max_new_tokens, "passkey", metadata)
