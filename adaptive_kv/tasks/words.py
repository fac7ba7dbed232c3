"""Needle keys and values (RULER's numbers / words / uuids) from wonderwords' bundled word lists."""

from __future__ import annotations

import functools
import importlib.resources
import random
import re
import uuid
from typing import Callable, Collection

VALUE_TYPES = ("numbers", "words", "uuids")
_WORD = re.compile(r"[a-z]+")
_MAX_DRAWS = 1000


@functools.cache
def word_list(kind: str) -> tuple[str, ...]:
    """Sorted unique lowercase words of wonderwords' ``{kind}list.txt``, read from the package files as RULER does."""
    if kind not in ("noun", "adjective", "verb"):
        raise ValueError(f"kind={kind!r} is not one of ('noun', 'adjective', 'verb')")
    # Plain a-z only: hyphens would blur the "adjective-noun" keys, capitals/spaces the cwe list.
    # Like wonderwords' own generator (unlike RULER), words on its profanity list are left out.
    blocked = _asset_words("profanity")
    return tuple(sorted(w for w in _asset_words(kind) if _WORD.fullmatch(w) and w not in blocked))


def _asset_words(kind: str) -> frozenset[str]:
    """Stripped lines of ``wonderwords/assets/{kind}list.txt``."""
    # Reading the shipped files avoids RULER's call into a private wonderwords helper.
    text = (importlib.resources.files("wonderwords") / "assets" / f"{kind}list.txt").read_text("utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def common_words_pool() -> tuple[str, ...]:
    """Nouns, adjectives and verbs, unique and sorted: RULER cwe's word pool."""
    return tuple(sorted(set(word_list("noun")) | set(word_list("adjective")) | set(word_list("verb"))))


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    """A random ``num_digits``-digit integer (RULER niah: 7 digits)."""
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_word(rng: random.Random) -> str:
    """A random ``adjective-noun`` pair, uniform over RULER's adjective x noun product without building it."""
    return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"


def random_uuid(rng: random.Random) -> str:
    """A random version-4 UUID from the seeded RNG (RULER niah)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def value_drawer(value_type: str) -> Callable[[random.Random], str]:
    """The RULER generator for ``value_type`` (``numbers``, ``words`` or ``uuids``)."""
    drawers = {"numbers": random_number, "words": random_word, "uuids": random_uuid}
    if value_type not in drawers:
        raise ValueError(f"value_type={value_type!r} is not one of {VALUE_TYPES}")
    return drawers[value_type]


def draw_fresh(
    rng: random.Random, draw: Callable[[random.Random], str], taken: list[str], forbidden_text: str = ""
) -> str:
    """Draw until the value neither overlaps (as a substring) a taken value nor occurs in ``forbidden_text``."""
    # Substring-free needles keep containment scoring and "appears exactly once" checks unambiguous.
    for _ in range(_MAX_DRAWS):
        value = draw(rng)
        if value not in forbidden_text and not any(value in t or t in value for t in taken):
            taken.append(value)
            return value
    raise RuntimeError(f"no fresh value after {_MAX_DRAWS} draws; taken={len(taken)} values")


def draw_many(
    rng: random.Random, draw: Callable[[random.Random], str], count: int, taken: list[str], forbidden_text: str = ""
) -> list[str]:
    """``count`` fresh values (see :func:`draw_fresh`), appended to ``taken`` as well."""
    return [draw_fresh(rng, draw, taken, forbidden_text) for _ in range(count)]


def shuffled(rng: random.Random, items: Collection[str]) -> list[str]:
    """A seeded permutation of ``items``."""
    return rng.sample(list(items), len(items))
