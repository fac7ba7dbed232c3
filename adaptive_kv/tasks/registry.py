"""Task registry and the seeded sample generator (RULER / Landmark attention tasks, offline)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from adaptive_kv.tasks.base import PieceEncoder, Task, TaskSample
from adaptive_kv.tasks.common_words import CommonWordsTask
from adaptive_kv.tasks.fidelity import FidelityTask
from adaptive_kv.tasks.niah import NiahTask, NiahVariant
from adaptive_kv.tasks.passkey import PasskeyTask
from adaptive_kv.tasks.variable_tracking import VariableTrackingTask

_ESSAY_NUMBERS = (NiahVariant("prose", "words", "numbers"),)

TASKS: dict[str, Task] = {
    "passkey": PasskeyTask(),
    # RULER niah_single_1/2/3 share one task here; value types cycle per sample so all three are covered.
    "niah_single": NiahTask(
        "niah_single",
        variants=(
            NiahVariant("repeat", "words", "numbers"),
            NiahVariant("prose", "words", "words"),
            NiahVariant("prose", "words", "uuids"),
        ),
    ),
    "niah_multikey": NiahTask("niah_multikey", _ESSAY_NUMBERS, num_keys=4),
    "niah_multivalue": NiahTask("niah_multivalue", _ESSAY_NUMBERS, num_values=4),
    "niah_multiquery": NiahTask("niah_multiquery", _ESSAY_NUMBERS, num_keys=4, num_queries=4),
    "variable_tracking": VariableTrackingTask(),
    "common_words": CommonWordsTask(),
    "fidelity": FidelityTask(),
}


def get_task(name: str) -> Task:
    """The registered task called ``name`` (RULER / Landmark attention / fidelity)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]


def make_samples(
    task: str | Task, tokenizer: PreTrainedTokenizerBase, context_length: int, n_samples: int, seed: int
) -> list[TaskSample]:
    """``n_samples`` samples of exactly ``context_length`` tokens; same seed, same samples (RULER-style seeding)."""
    resolved = get_task(task) if isinstance(task, str) else task
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length={context_length!r} must be a positive int")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
        raise ValueError(f"n_samples={n_samples!r} must be a non-negative int")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")
    encoder = PieceEncoder(tokenizer)
    return [resolved.build(encoder, context_length, seed, index) for index in range(n_samples)]
