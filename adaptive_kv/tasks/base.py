"""Sample type, piecewise tokenisation and the shared contract of every task."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from transformers import PreTrainedTokenizerBase

TokenIds = tuple[int, ...]


@dataclass(frozen=True)
class TaskSample:
    """One prompt split for two protocols (RULER's context / question / answer-prefix split, as kvpress does).

    ``query_aware``: prefill ``context_ids + question_ids``, then compress.
    ``query_agnostic``: prefill and compress ``context_ids``, then feed ``question_ids``.
    ``question_ids`` already ends with the answer prefix, so generation starts right after it.
    """

    task: str
    context_ids: TokenIds
    question_ids: TokenIds
    answers: tuple[str, ...]
    max_new_tokens: int
    metric: str  # a key of scoring.METRICS, or "none" (fidelity: scored on logits, not text)
    metadata: dict[str, Any] = field(default_factory=dict)
    continuation_ids: TokenIds = ()  # teacher-forced text after the context (fidelity only)

    @property
    def prompt_ids(self) -> TokenIds:
        """The full prompt, ``context_ids + question_ids``."""
        return self.context_ids + self.question_ids

    @property
    def context_length(self) -> int:
        """Prompt length in tokens; equals the requested ``context_length`` exactly."""
        return len(self.context_ids) + len(self.question_ids)


@dataclass(frozen=True)
class Piece:
    """A separately tokenised span; needles are marked so their token spans can be reported."""

    ids: TokenIds
    is_needle: bool = False


class PieceEncoder:
    """Tokenises text pieces without special tokens, so lengths add up exactly when ids are concatenated."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.bos_ids: TokenIds = _bos_ids(tokenizer)
        # Filler units repeat thousands of times per sample; encoding each once keeps long contexts cheap.
        self._cache: dict[str, TokenIds] = {}

    def encode(self, text: str) -> TokenIds:
        """Token ids of ``text`` with no special tokens added."""
        if not text:
            raise ValueError("text must be a non-empty string; empty pieces have no tokens to count")
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            self._cache[text] = ids
        return ids

    def piece(self, text: str, is_needle: bool = False) -> Piece:
        """``text`` as a :class:`Piece`."""
        return Piece(self.encode(text), is_needle)


def _bos_ids(tokenizer: PreTrainedTokenizerBase) -> TokenIds:
    """BOS only if the tokenizer has one and its own encoding prepends it (Llama yes, GPT-2 no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ()
    with_special = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    return (bos,) if with_special[:1] == [bos] and without[:1] != [bos] else ()


def assemble(pieces: Sequence[Piece]) -> tuple[TokenIds, tuple[tuple[int, int], ...]]:
    """Concatenate piece ids; also return the ``(start, end)`` token span of every needle piece."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        if piece.is_needle:
            spans.append((len(ids), len(ids) + len(piece.ids)))
        ids.extend(piece.ids)
    return tuple(ids), tuple(spans)


def pieces_length(pieces: Sequence[Piece]) -> int:
    """Total tokens in ``pieces``."""
    return sum(len(piece.ids) for piece in pieces)


def sample_rng(task: str, seed: int, index: int) -> random.Random:
    """A private RNG per (task, seed, sample index); string seeds hash stably across runs."""
    return random.Random(f"{task}/{seed}/{index}")


def haystack_budget(task: str, context_length: int, fixed_tokens: int) -> int:
    """Tokens left for the haystack; ValueError when the fixed parts alone do not fit."""
    if context_length < fixed_tokens:
        raise ValueError(
            f"context_length={context_length} is below the minimum {fixed_tokens} tokens that task "
            f"{task!r} needs with this tokenizer; use context_length >= {fixed_tokens}"
        )
    return context_length - fixed_tokens


class Task(Protocol):
    """A seeded generator of token-exact samples."""

    name: str

    def build(self, encoder: PieceEncoder, context_length: int, seed: int, index: int) -> TaskSample:
        """Sample ``index`` of the stream for ``seed``, exactly ``context_length`` tokens long."""
        ...
