"""The on-disk example cache of `train-scorer`: one file per context, so a long collection (an 8k
context is minutes of exact reconstruction pass on a CPU) can be made in parts, and a rerun with more
lengths or contexts computes only the examples it lacks.

A file is named by a fingerprint of everything that shapes its example: the model's weights and
config, the context ids, the tokens drawn and the draw's seed. A file that does not read back (a
truncated write, another format) or holds another fingerprint is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adaptive_kv.training import atomic
from adaptive_kv.training.calibration import CalibrationRequest
from adaptive_kv.training.scorer import ScorerExample


def example_key(model_sha: str, request: CalibrationRequest, sample_tokens: int, seed: int) -> str:
    """The fingerprint of one context's example."""
    fields = {"model": model_sha, "context": list(request.context_ids), "sample_tokens": sample_tokens, "seed": seed}
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:24]


def path_for(folder: Path, key: str) -> Path:
    """Where the example with fingerprint `key` lives."""
    return folder / f"{key}.safetensors"


def load(folder: Path, key: str, request_key: str) -> ScorerExample | None:
    """The cached example, or None unless its file reads back whole under this fingerprint."""
    from safetensors import safe_open

    path = path_for(folder, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != key:
                return None
            inputs, targets = handle.get_tensor("inputs"), handle.get_tensor("targets")
            positions, seq_len = handle.get_tensor("positions"), int(handle.metadata()["seq_len"])
        return ScorerExample(request_key, inputs, targets, positions, seq_len)
    except Exception:  # a truncated or foreign file (or one without positions): safetensors, OS, header errors alike
        return None


def store(folder: Path, key: str, example: ScorerExample) -> Path:
    """Write one example, all or nothing (a killed run leaves no truncated file under the real name)."""
    from safetensors.torch import save_file

    tensors = {"inputs": example.inputs.contiguous(), "targets": example.targets.contiguous(),
               "positions": example.positions.contiguous()}
    metadata = {"fingerprint": key, "seq_len": str(example.seq_len)}
    return atomic.write_file(path_for(folder, key), lambda tmp: save_file(tensors, str(tmp), metadata))
