"""Needle-in-a-haystack tasks in RULER's format (Hsieh et al., 2024, RULER ``niah.py``)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from adaptive_kv.tasks import haystack as hs
from adaptive_kv.tasks.base import Piece, PieceEncoder, TaskSample, assemble, haystack_budget, pieces_length, sample_rng
from adaptive_kv.tasks.words import VALUE_TYPES, draw_many, value_drawer

# RULER: needle depths are drawn without replacement from 40 evenly spaced percentages.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
INTRO = (
    "Some special magic {type_v} are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the {type_v} afterwards."
)
QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
# The separator each haystack kind puts between units, as RULER joins them.
SEPARATORS = {"repeat": "\n", "prose": " "}


@dataclass(frozen=True)
class NiahVariant:
    """Haystack kind and needle key/value types (a row of RULER's synthetic.yaml)."""

    haystack: str
    key_type: str
    value_type: str

    def __post_init__(self) -> None:
        if self.haystack not in hs.HAYSTACK_KINDS:
            raise ValueError(f"haystack={self.haystack!r} is not one of {hs.HAYSTACK_KINDS}")
        for name in ("key_type", "value_type"):
            if getattr(self, name) not in VALUE_TYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {VALUE_TYPES}")


@dataclass(frozen=True)
class NiahTask:
    """RULER niah: ``num_keys`` keys x ``num_values`` values, ``num_queries`` keys asked; variants cycle by sample."""

    name: str
    variants: tuple[NiahVariant, ...]
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants must hold at least one NiahVariant")
        for name in ("num_keys", "num_values", "num_queries", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_queries > self.num_keys:
            raise ValueError(f"num_queries={self.num_queries} must be <= num_keys={self.num_keys}")
        if self.num_keys * self.num_values > len(DEPTHS):
            raise ValueError(f"num_keys * num_values must be <= {len(DEPTHS)} (one distinct depth per needle)")

    def build(self, encoder: PieceEncoder, context_length: int, seed: int, index: int) -> TaskSample:
        """One RULER niah sample of exactly ``context_length`` tokens; needles are never trimmed."""
        rng = sample_rng(self.name, seed, index)
        # Cycling (not drawing) guarantees every variant appears in any run of len(variants) samples.
        variant = self.variants[(seed + index) % len(self.variants)]
        keys, values, needle_texts = self._needles(variant, rng)
        queried = rng.sample(range(self.num_keys), self.num_queries)
        query_keys = [keys[i] for i in queried]
        intro, question, prefix = self._templates(variant, _join_keys(query_keys))
        separator = SEPARATORS[variant.haystack]
        head = [Piece(encoder.bos_ids), encoder.piece(intro + ("\n" if separator == " " else ""))]
        needles = [encoder.piece(separator + text, is_needle=True) for text in needle_texts]
        tail = [encoder.piece("\n")]
        question_ids = encoder.encode(question) + encoder.encode(prefix)
        budget = haystack_budget(self.name, context_length, pieces_length(head + needles + tail) + len(question_ids))
        units, pad = hs.fill(encoder, hs.unit_texts(variant.haystack, rng, separator), budget)
        depths = rng.sample(DEPTHS, len(needles))
        body = hs.insert(units, needles, hs.depth_positions(len(units), depths))
        context_ids, spans = assemble(head + hs.with_pad(body, pad) + tail)
        metadata = {
            "haystack": variant.haystack, "key_type": variant.key_type, "value_type": variant.value_type,
            "depths": tuple(sorted(depths)), "needle_spans": spans, "needles": tuple(needle_texts),
            "query_keys": tuple(query_keys), "seed": seed, "index": index,
        }
        answers = tuple(value for i in queried for value in values[i])
        return TaskSample(self.name, context_ids, question_ids, answers, self.max_new_tokens,
                          "string_match_all", metadata)

    def _templates(self, variant: NiahVariant, query: str) -> tuple[str, str, str]:
        """Intro, question and answer prefix, made singular as RULER does when one value is asked for."""
        type_v, templates = variant.value_type, (INTRO, QUESTION, ANSWER_PREFIX)
        if self.num_queries * self.num_values == 1:
            templates = tuple(t.replace("Some", "A").replace("are all", "is").replace("are", "is") for t in templates)
            type_v = type_v[:-1]
        intro, question, prefix = (t.format(type_v=type_v, query=query) for t in templates)
        return intro, question, prefix

    def _needles(self, variant: NiahVariant, rng: random.Random) -> tuple[list[str], list[list[str]], list[str]]:
        """Keys, values per key and shuffled needle sentences; none occurs in the prose corpus."""
        taken: list[str] = []
        forbidden = hs.prose_corpus_text()
        keys = draw_many(rng, value_drawer(variant.key_type), self.num_keys, taken, forbidden)
        values = [draw_many(rng, value_drawer(variant.value_type), self.num_values, taken, forbidden) for _ in keys]
        # RULER formats needles with the plural type name even in the singular template.
        needles = [NEEDLE.format(type_v=variant.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        return keys, values, needles


def _join_keys(keys: list[str]) -> str:
    """RULER's query text: ``"a"`` or ``"a, b, and c"``."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]
