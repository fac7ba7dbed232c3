"""Offline filler text and exact-length haystack fitting."""

from __future__ import annotations

import functools
import itertools
import random
import re
from typing import Iterator, Sequence

import pydoc_data.topics

from adaptive_kv.tasks.base import Piece, PieceEncoder

# The "repeat" haystack of RULER and the garbage of Landmark attention's passkey test.
REPEAT_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACK_KINDS = ("repeat", "prose")

_HEADING_UNDERLINE = set("*=-~^")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
# Prose sentences only: no digits (so 5/7-digit needles can never collide with the haystack),
# no grammar or markup characters from the reference manual's code blocks.
_PROSE_SENTENCE = re.compile(r"[A-Z][^\d*=<>|{}\[\]\\]+\.")


@functools.cache
def prose_paragraphs() -> tuple[str, ...]:
    """Unindented prose paragraphs of CPython's bundled ``pydoc_data.topics`` (stand-in for RULER's essays)."""
    paragraphs = []
    for name in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            lines = block.strip("\n").split("\n")
            # Indented blocks are code or grammar; an underline marks a heading.
            if any(line.startswith((" ", "\t")) for line in lines):
                continue
            if len(lines) > 1 and set(lines[-1].strip()) <= _HEADING_UNDERLINE:
                continue
            paragraph = re.sub(r"(?<=\w-) (?=\w)", "", " ".join(line.strip() for line in lines))
            # A trailing colon introduces a code block that was dropped; short blocks are captions.
            if not paragraph.endswith(":") and len(paragraph.split()) >= 5:
                paragraphs.append(paragraph)
    return tuple(paragraphs)


@functools.cache
def prose_sentences() -> tuple[str, ...]:
    """Digit-free English sentences (5-60 words) from :func:`prose_paragraphs` (RULER essay haystack stand-in)."""
    sentences = []
    for paragraph in prose_paragraphs():
        for sentence in _SENTENCE_SPLIT.split(paragraph):
            if _PROSE_SENTENCE.fullmatch(sentence) and 5 <= len(sentence.split()) <= 60:
                sentences.append(sentence)
    return tuple(sentences)


@functools.cache
def prose_corpus_text() -> str:
    """All prose sentences in one string, to reject needles that already occur in the haystack."""
    return "\n".join(prose_sentences())


def unit_texts(kind: str, rng: random.Random, separator: str) -> Iterator[str]:
    """Endless filler units, each prefixed by ``separator``: RULER's repeat text or prose from a seeded offset."""
    if kind == "repeat":
        return itertools.repeat(separator + REPEAT_TEXT)
    if kind == "prose":
        sentences = prose_sentences()
        start = rng.randrange(len(sentences))
        # Cycling: contexts beyond the corpus (~25k tokens) reuse it from the start.
        ordered = sentences[start:] + sentences[:start]
        return (separator + sentence for sentence in itertools.cycle(ordered))
    raise ValueError(f"haystack kind={kind!r} is not one of {HAYSTACK_KINDS}")


def fill(encoder: PieceEncoder, units: Iterator[str], budget: int) -> tuple[list[Piece], Piece | None]:
    """Whole units while they fit, then the first tokens of the next unit so the total is exactly ``budget``."""
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    whole: list[Piece] = []
    remaining = budget
    while remaining > 0:
        text = next(units)
        ids = encoder.encode(text)
        if not ids:
            raise ValueError(f"filler unit {text!r} encodes to no tokens with this tokenizer; it cannot fill a haystack")
        if len(ids) > remaining:
            # Trim at the haystack's end, never inside a needle: needles are separate pieces.
            return whole, Piece(ids[:remaining])
        whole.append(Piece(ids))
        remaining -= len(ids)
    return whole, None


def insert(units: Sequence[Piece], needles: Sequence[Piece], positions: Sequence[int]) -> list[Piece]:
    """Insert ``needles[i]`` before ``units[positions[i]]`` (sorted positions in ``[0, len(units)]``), as RULER does."""
    if len(needles) != len(positions):
        raise ValueError(f"positions has {len(positions)} entries; needles has {len(needles)}, they must match")
    if list(positions) != sorted(positions) or (positions and not 0 <= positions[0] <= positions[-1] <= len(units)):
        raise ValueError(f"positions must be sorted and within [0, {len(units)}], got {list(positions)}")
    out: list[Piece] = []
    previous = 0
    for position, needle in zip(positions, needles):
        out.extend(units[previous:position])
        out.append(needle)
        previous = position
    out.extend(units[previous:])
    return out


def depth_positions(num_units: int, depths: Sequence[int]) -> list[int]:
    """Unit index for each depth percentage, sorted: ``int(num_units * depth / 100)`` as in RULER's niah.py."""
    return sorted(int(num_units * depth / 100) for depth in depths)


def with_pad(pieces: list[Piece], pad: Piece | None) -> list[Piece]:
    """``pieces`` followed by the trimmed unit, if any."""
    return pieces + ([pad] if pad is not None else [])

