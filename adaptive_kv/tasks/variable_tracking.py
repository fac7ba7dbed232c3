"""Variable tracking (vt) in RULER's format (Hsieh et al., 2024, RULER ``variable_tracking.py``)."""

from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass

from adaptive_kv.tasks import haystack as hs
from adaptive_kv.tasks.base import Piece, PieceEncoder, TaskSample, assemble, haystack_budget, pieces_length, sample_rng

INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
# "assgined" is RULER's typo, kept so prompts match the benchmark.
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assgined the value {query}, they are: "
)
# RULER's noise, split into sentences so chain statements spread out even in short contexts.
NOISE_SENTENCES = tuple(s + "." for s in hs.REPEAT_TEXT.rstrip(".").split(". "))
_NOISE_TAIL = "\n"  # RULER ends each noise paragraph with a newline


@dataclass(frozen=True)
class VariableTrackingTask:
    """RULER vt: one chain of ``num_hops`` assignments hidden in noise, after a one-shot example."""

    name: str = "variable_tracking"
    num_hops: int = 4
    icl_noise_sentences: int = 10  # RULER fits its example to 500 tokens; ours is short and fixed
    max_new_tokens: int = 30

    def __post_init__(self) -> None:
        for name in ("num_hops", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.icl_noise_sentences < 0:
            raise ValueError(f"icl_noise_sentences={self.icl_noise_sentences} must be >= 0")

    def build(self, encoder: PieceEncoder, context_length: int, seed: int, index: int) -> TaskSample:
        """A vt sample of exactly ``context_length`` tokens, after the one-shot example shared by the seed."""
        icl_pieces, icl_names, icl_value = self._example(encoder, seed)
        rng = sample_rng(self.name, seed, index)
        names = _chain_names(rng, self.num_hops, 5, icl_names)
        value = _value_other_than(rng, icl_value)
        head = [Piece(encoder.bos_ids), *icl_pieces, encoder.piece(INTRO)]
        chain = _chain_pieces(encoder, names, value, is_needle=True)
        tail = [encoder.piece("\n")]
        question_ids = sum((p.ids for p in _question_pieces(encoder, names, value)), ())
        budget = haystack_budget(self.name, context_length, pieces_length(head + chain + tail) + len(question_ids))
        units, pad = hs.fill(encoder, _noise_texts(), budget)
        body = hs.insert(units, chain, _positions(rng, len(units), len(chain)))
        context_ids, spans = assemble(head + hs.with_pad(body, pad) + tail)
        metadata = {"value": value, "icl_names": tuple(icl_names), "needle_spans": spans, "seed": seed, "index": index}
        return TaskSample(self.name, context_ids, question_ids, tuple(names), self.max_new_tokens,
                          "string_match_all", metadata)

    def _example(self, encoder: PieceEncoder, seed: int) -> tuple[list[Piece], list[str], str]:
        """RULER's one-shot example (3-letter names): template, answer prefix and answer, then a blank line."""
        rng = random.Random(f"{self.name}/icl/{seed}")  # RULER builds one example for the whole set
        names, value = _chain_names(rng, self.num_hops, 3, []), str(rng.randint(10000, 99999))
        units = [encoder.piece(text) for text in itertools.islice(_noise_texts(), self.icl_noise_sentences)]
        chain = _chain_pieces(encoder, names, value, is_needle=False)
        pieces = [encoder.piece(INTRO), *hs.insert(units, chain, _positions(rng, len(units), len(chain)))]
        pieces += [encoder.piece("\n"), *_question_pieces(encoder, names, value)]
        pieces.append(encoder.piece(" ".join(names) + "\n\n"))
        return pieces, names, value


def _positions(rng: random.Random, num_units: int, count: int) -> list[int]:
    """Sorted insertion points in ``[0, num_units]``, distinct if there is room, as RULER samples them."""
    slots = range(num_units + 1)
    return sorted(rng.sample(slots, count) if len(slots) >= count else rng.choices(slots, k=count))


def _noise_texts() -> itertools.cycle:
    """RULER's noise sentences, space-joined, with a newline closing each paragraph."""
    last = len(NOISE_SENTENCES) - 1
    return itertools.cycle([" " + s + (_NOISE_TAIL if i == last else "") for i, s in enumerate(NOISE_SENTENCES)])


def _value_other_than(rng: random.Random, other: str) -> str:
    """A 5-digit value (RULER vt) different from the example's, so the question has one answer chain."""
    while (value := str(rng.randint(10000, 99999))) == other:
        pass
    return value


def _chain_names(rng: random.Random, num_hops: int, length: int, avoid: list[str]) -> list[str]:
    """``num_hops + 1`` distinct upper-case names, none overlapping another or any name in ``avoid``."""
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        # Substring-free names keep "VAR ABC" of the example out of "VAR XABCY" of the task.
        if not any(name in other or other in name for other in names + avoid):
            names.append(name)
    return names


def _chain_pieces(encoder: PieceEncoder, names: list[str], value: str, is_needle: bool) -> list[Piece]:
    """``VAR X0 = value`` then ``VAR X{j+1} = VAR X{j}``, one piece per statement (RULER vt)."""
    statements = [f" VAR {names[0]} = {value}"] + [f" VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    return [encoder.piece(s, is_needle=is_needle) for s in statements]


def _question_pieces(encoder: PieceEncoder, names: list[str], value: str) -> list[Piece]:
    """RULER vt's question and answer prefix for a chain."""
    prefix = ANSWER_PREFIX.format(num_v=len(names), query=value)
    return [encoder.piece(QUESTION.format(query=value)), encoder.piece(prefix)]
