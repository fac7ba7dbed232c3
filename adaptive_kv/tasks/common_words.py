"""Common words extraction (cwe) in RULER's format (Hsieh et al., 2024, RULER ``common_words_extraction.py``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

from adaptive_kv.tasks.base import (
    Piece, PieceEncoder, TaskSample, TokenIds, assemble, haystack_budget, pieces_length, sample_rng,
)
from adaptive_kv.tasks.words import common_words_pool, shuffled

INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
QUESTION = "Question: What are the {num} most common words in the above list?"
ANSWER_PREFIX = " Answer: The top {num} words that appear most often in the list are:"


@dataclass(frozen=True)
class CweSetting:
    """RULER ``get_example`` repetitions: the one-shot example's, then the task's (whose word count grows to fit)."""

    icl_words: int
    icl_common_reps: int
    icl_uncommon_reps: int
    common_reps: int
    uncommon_reps: int


SMALL = CweSetting(icl_words=20, icl_common_reps=3, icl_uncommon_reps=1, common_reps=6, uncommon_reps=1)
LARGE = CweSetting(icl_words=40, icl_common_reps=10, icl_uncommon_reps=3, common_reps=30, uncommon_reps=3)


@dataclass(frozen=True)
class CommonWordsTask:
    """RULER cwe: name the ``num_common`` words repeated most in a numbered list, after a one-shot example."""

    name: str = "common_words"
    num_common: int = 10
    large_from: int = 4096  # RULER switches to the LARGE repetitions at this max length
    max_new_tokens: int = 120

    def __post_init__(self) -> None:
        for name in ("num_common", "large_from", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def build(self, encoder: PieceEncoder, context_length: int, seed: int, index: int) -> TaskSample:
        """A cwe sample of exactly ``context_length`` tokens: the uncommon-word count grows until it fills."""
        rng = sample_rng(self.name, seed, index)
        setting = LARGE if context_length >= self.large_from else SMALL
        if setting.icl_words <= self.num_common:
            raise ValueError(f"num_common={self.num_common} must be below icl_words={setting.icl_words}")
        words = shuffled(rng, common_words_pool())
        icl_words, words = words[: setting.icl_words], words[setting.icl_words :]
        common = words[: self.num_common]
        # Uncommon words never contain (or hide inside) a common one, so containment scoring stays exact.
        rest = (w for w in words[self.num_common :] if not any(c in w or w in c for c in common))
        question = self._question(encoder)
        head = [Piece(encoder.bos_ids), *self._example(encoder, icl_words, setting, rng), encoder.piece(INTRO)]
        common_entries = common * setting.common_reps
        tail = [encoder.piece("\n")]
        question_ids = question[0].ids + question[1].ids
        fixed = pieces_length(head + _numbered(encoder, common_entries) + tail) + len(question_ids)
        budget = haystack_budget(self.name, context_length, fixed)
        uncommon, pad = _fit_uncommon(encoder, rest, budget, len(common_entries) + 1, setting.uncommon_reps)
        entries = common_entries + uncommon * setting.uncommon_reps
        rng.shuffle(entries)
        context_ids, _ = assemble(head + _numbered(encoder, entries) + [Piece(pad)] + tail)
        metadata = {"num_entries": len(entries), "num_uncommon": len(uncommon), "common_reps": setting.common_reps,
                    "icl_answers": tuple(icl_words[: self.num_common]), "seed": seed, "index": index}
        return TaskSample(self.name, context_ids, question_ids, tuple(common), self.max_new_tokens,
                          "string_match_all", metadata)

    def _question(self, encoder: PieceEncoder) -> list[Piece]:
        """RULER cwe's question and answer prefix."""
        texts = (QUESTION.format(num=self.num_common), ANSWER_PREFIX.format(num=self.num_common))
        return [encoder.piece(text) for text in texts]

    def _example(
        self, encoder: PieceEncoder, icl_words: list[str], setting: CweSetting, rng: random.Random
    ) -> list[Piece]:
        """RULER's one-shot example: its list, question, answer prefix and the numbered answer, then a newline."""
        common, uncommon = icl_words[: self.num_common], icl_words[self.num_common :]
        entries = common * setting.icl_common_reps + uncommon * setting.icl_uncommon_reps
        rng.shuffle(entries)
        pieces = [encoder.piece(INTRO), *_numbered(encoder, entries), encoder.piece("\n")]
        pieces += self._question(encoder)
        return pieces + [*_numbered(encoder, common, leading=" "), encoder.piece("\n")]


def _number(encoder: PieceEncoder, k: int, leading: str) -> TokenIds:
    """The entry label ``k.``; only entry 1 of a list may go without the space that joins entries."""
    return encoder.encode(f"{leading if k == 1 else ' '}{k}.")


def _numbered(encoder: PieceEncoder, entries: Iterable[str], leading: str = "") -> list[Piece]:
    """RULER's ``"1. w 2. w ..."`` as pieces; label and word are tokenised apart so lengths don't depend on order."""
    pieces = []
    for k, word in enumerate(entries, start=1):
        pieces += [Piece(_number(encoder, k, leading)), encoder.piece(" " + word)]
    return pieces


def _fit_uncommon(
    encoder: PieceEncoder, stream: Iterator[str], budget: int, first: int, reps: int
) -> tuple[list[str], TokenIds]:
    """Uncommon words (each ``reps`` entries from number ``first`` on) while they fit, then the next unit's head."""
    chosen: list[str] = []
    remaining, number = budget, first
    for word in stream:
        if remaining == 0:
            return chosen, ()
        unit = sum((_number(encoder, number + r, "") + encoder.encode(" " + word) for r in range(reps)), ())
        if len(unit) > remaining:
            # Trim the would-be next unit at the list's end; common entries are never cut.
            return chosen, unit[:remaining]
        chosen.append(word)
        remaining -= len(unit)
        number += reps
    if remaining == 0:
        return chosen, ()
    raise ValueError(
        f"context_length is too long for the cwe word pool: {len(chosen)} uncommon words leave "
        f"{remaining} tokens unfilled; use a shorter context_length"
    )
