"""An evaluation's state after each sample, so a long run (an 8k-token row is hours on a CPU) survives
being stopped and can later grow to more samples.

The file holds the run's identity (every setting but the sample count), the (task, sample index)
pairs done and each (policy, budget, task) tally. Samples are made from (seed, index), so the first
N samples of a longer run are the N already done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.json"


def write_progress(path: Path, identity: dict[str, Any], done: list[tuple[str, int]],
                   tallies: list[tuple[tuple[str, float, str], dict[str, Any]]], seconds: float) -> None:
    """Replace `path` atomically, so a run killed while writing leaves the previous state."""
    state = {"identity": identity, "done": [list(d) for d in done], "seconds": round(seconds, 3),
             "tallies": [{"key": list(key), "tally": tally} for key, tally in tallies]}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(state))
    os.replace(partial, path)


def read_progress(path: Path, identity: dict[str, Any], samples: int) -> dict[str, Any]:
    """The state in `path`, refused unless it was made with the same settings and at most `samples` samples."""
    try:
        state = json.loads(path.read_text())
        recorded, done = state["identity"], state["done"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot resume from {path}: not a progress file ({exc})") from None
    for key, value in identity_of(identity).items():
        if recorded.get(key) != value:
            raise ValueError(f"cannot resume from {path}: {key} was {recorded.get(key)!r}, now {value!r}")
    reached = max((index + 1 for _, index in done), default=0)
    if reached > samples:
        raise ValueError(f"cannot resume from {path}: samples must be >= {reached}, the samples already done")
    return state


def identity_of(fields: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON reads them back (tuples become lists), so recorded and current ones compare equal."""
    return json.loads(json.dumps(fields))
