"""The on-disk label cache of `train`: one folder per fingerprint of everything that shapes the labels.

The fingerprint hashes the model's weights and config, every request's ids (so the task mix, context
length, sample counts, seeds and tokenizer), the layout and label target, and the scorer's files when
the labels read predicted scores: a rerun in the same output folder with any of them changed computes
new labels instead of reading stale ones. A folder is used only when every file is there and reads back
to exactly the requests asked for; anything else (a missing sidecar, a truncated file) is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from adaptive_kv.training.calibration import CalibrationRequest
from adaptive_kv.training.labels import RequestLabels, load_labels, save_labels

SPLITS = ("train", "valid")
MANIFEST = "manifest.json"


def model_digest(model) -> str:
    """SHA-256 of a model's config and every parameter and buffer (names, dtypes, shapes, bytes)."""
    import torch

    sha = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        sha.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        sha.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return sha.hexdigest()


def fingerprint(model_sha: str, trial, requests: dict[str, list[CalibrationRequest]]) -> str:
    """The cache key of `trial`'s labels of `requests` (split name -> requests) on the model `model_sha`."""
    sha = hashlib.sha256(json.dumps({"model": model_sha, "layout": trial.layout_key(),
                                     "reconstruction": trial.reconstruction}).encode())
    for split in SPLITS:
        for request in requests[split]:
            sha.update(json.dumps([split, asdict(request)]).encode())
    if trial.scorer_path is not None:
        for path in sorted(Path(trial.scorer_path).iterdir()):
            if path.is_file():
                sha.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return sha.hexdigest()[:16]


def folder_for(root: Path, trial, key: str) -> Path:
    """Where the labels of `trial` with fingerprint `key` live (the layout stays readable in the name)."""
    return root / f"{trial.layout_key()}-{key}"


def load(folder: Path, requests: dict[str, list[CalibrationRequest]]) -> dict[str, list[RequestLabels]] | None:
    """The cached labels, or None unless every file is there, reads and holds exactly `requests`."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        out = {split: load_labels(folder / f"{split}.safetensors") for split in SPLITS}
    except Exception:  # a truncated or half-written file: safetensors, JSON and OS errors alike
        return None
    for split in SPLITS:
        if [x.key for x in out[split]] != [r.key for r in requests[split]]:
            return None
    return out


def store(folder: Path, labels: dict[str, list[RequestLabels]], key: str) -> None:
    """Write every split (each file atomically), then the manifest that marks the folder complete."""
    from adaptive_kv.training import atomic

    for split in SPLITS:
        save_labels(folder / f"{split}.safetensors", labels[split])
    atomic.write_text(folder / MANIFEST, json.dumps({"fingerprint": key, "splits": list(SPLITS)}))
