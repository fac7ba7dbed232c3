"""Text scorers: RULER's ``string_match_all`` and the Landmark attention passkey check."""

from __future__ import annotations

import re
from typing import Callable, Sequence

from adaptive_kv.tasks.base import TaskSample

_CONTROL = re.compile(r"[\x00-\x1f]")
_INTEGER = re.compile(r"\d+")


def clean_prediction(prediction: str) -> str:
    """RULER ``postprocess_pred``: strip, turn control characters ``[\\x00-\\x1f]`` into newlines, strip again."""
    # A newline rather than nothing, as RULER does: deleting "\t" could glue "12\t34" into a false match.
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER ``string_match_all`` for one sample: 100 x the fraction of references contained, case-insensitive."""
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty sequence of strings (not a bare str)")
    text = clean_prediction(prediction).lower()
    return 100.0 * sum(ref.lower() in text for ref in references) / len(references)


def passkey_match(prediction: str, key: str) -> float:
    """Landmark attention passkey: 100 if the first integer equals ``key`` or ``key`` appears in the output, else 0."""
    if not key.isdigit():
        raise ValueError(f"key={key!r} must be a string of digits")
    text = clean_prediction(prediction)
    first = _INTEGER.search(text)
    return 100.0 if (first is not None and first.group() == key) or key in text else 0.0


def _passkey(prediction: str, references: Sequence[str]) -> float:
    """Passkey samples carry exactly one reference, the key."""
    if len(references) != 1:
        raise ValueError(f"passkey references must hold exactly one key, got {len(references)}")
    return passkey_match(prediction, references[0])


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "passkey": _passkey,
}


def score_sample(sample: TaskSample, prediction: str) -> float:
    """Score one generation (0-100) with the sample's metric (RULER / Landmark attention)."""
    if sample.metric not in METRICS:
        raise ValueError(
            f"metric={sample.metric!r} of task {sample.task!r} has no text scorer; allowed: {sorted(METRICS)} "
            "(fidelity samples are scored on logits with logit_metrics)"
        )
    return METRICS[sample.metric](prediction, sample.answers)
