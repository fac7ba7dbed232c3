"""Calibration and validation requests for the controller, with seeds disjoint from evaluation.

A request is a context (what gets compressed) and what follows it (the queries whose attention
the compression must preserve): the question and the reference answer of a task sample, or the
next tokens of natural text. Both protocols are covered: query-agnostic requests compress the
context alone; query-aware ones compress context + question and follow with the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_kv.tasks import make_samples

# `adaptive-kv eval` and every committed figure use seeds below this; training never does.
EVALUATION_SEEDS = range(0, 10_000)
CALIBRATION_SEED = 10_000
VALIDATION_SEED = 20_000
PROTOCOLS = ("query_agnostic", "query_aware")
# context lengths a calibration request may be made at, in tokens
MIN_CONTEXT, MAX_CONTEXT = 64, 16384
DEFAULT_MIX: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "variable_tracking", "fidelity")


@dataclass(frozen=True)
class CalibrationRequest:
    """One request: context ids, ids that follow, how many of them are the answer (0 = natural text), and
    the context length its sample was made for (several lengths train one controller). A task request
    also carries what `eval` scores a generated answer with: the answers, the metric and the token cap."""

    task: str
    protocol: str
    context_ids: tuple[int, ...]
    follow_ids: tuple[int, ...]
    answer_tokens: int
    seed: int
    index: int
    length: int
    answers: tuple[str, ...] = ()
    metric: str = "none"
    max_new_tokens: int = 0

    @property
    def key(self) -> str:
        """A stable identifier."""
        return f"{self.task}/{self.protocol}/{self.length}/{self.seed}/{self.index}"


def answer_ids(tokenizer, answers: tuple[str, ...]) -> tuple[int, ...]:
    """Reference answer ids as they follow an answer prefix (a leading space, answers joined)."""
    return tuple(tokenizer.encode(" " + ", ".join(answers), add_special_tokens=False))


def make_requests(tokenizer, *, tasks: tuple[str, ...], context_length: int, per_task: int, seed: int,
                  protocols: tuple[str, ...] = PROTOCOLS) -> list[CalibrationRequest]:
    """`per_task` samples of every task under every protocol (fidelity has one protocol: no question)."""
    if seed in EVALUATION_SEEDS:
        raise ValueError(f"seed {seed} is reserved for evaluation (seeds in [0, {EVALUATION_SEEDS.stop}))")
    out = []
    for task in tasks:
        for index, sample in enumerate(make_samples(task, tokenizer, context_length, per_task, seed)):
            if task == "fidelity":
                out.append(CalibrationRequest(task, "query_agnostic", sample.context_ids,
                                              sample.continuation_ids, 0, seed, index, context_length))
                continue
            answer = answer_ids(tokenizer, sample.answers)
            for protocol in protocols:
                if protocol == "query_agnostic":
                    context, follow = sample.context_ids, sample.question_ids + answer
                else:
                    context, follow = sample.prompt_ids, answer
                out.append(CalibrationRequest(task, protocol, context, follow, len(answer), seed, index, context_length,
                                              sample.answers, sample.metric, sample.max_new_tokens))
    return out


def make_split(tokenizer, *, tasks: tuple[str, ...], context_lengths: tuple[int, ...], train_per_task: int,
               valid_per_task: int, protocols: tuple[str, ...] = PROTOCOLS) -> tuple[list, list]:
    """Training (calibration seed) and validation (validation seed) requests at every context length."""
    train: list[CalibrationRequest] = []
    valid: list[CalibrationRequest] = []
    for length in context_lengths:
        common = dict(tasks=tasks, context_length=length, protocols=protocols)
        train += make_requests(tokenizer, per_task=train_per_task, seed=CALIBRATION_SEED, **common)
        valid += make_requests(tokenizer, per_task=valid_per_task, seed=VALIDATION_SEED, **common)
    return train, valid
