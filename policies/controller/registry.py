"""Learned controllers in the MLflow model registry: where the store is, and fetching a registered controller.

Training registers controllers (`adaptive_kv.training.tracking`); the service loads them by URI.
Both reach the store through here, so the service needs no part of training. mlflow is imported
only when a registry URI is fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path("mlruns")


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def fetch_controller(uri: str, tracking: str | None = None) -> Path:
    """A local controller folder for `uri`: a folder path, or an MLflow model URI (models:/name@alias)."""
    if not uri.startswith(("models:/", "runs:/")):
        folder = Path(uri)
        if not (folder / "controller.json").is_file():
            raise ValueError(f"policy-uri {uri!r} is neither an MLflow model URI nor a controller folder")
        return folder
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(tracking))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # MLflow raises several types for unknown names, aliases and stores
        raise ValueError(f"cannot fetch {uri!r} from {tracking_uri(tracking)}: {exc}") from None
    found = sorted(local.rglob("controller.json"))
    if not found:
        raise ValueError(f"{uri!r} holds no controller.json")
    return found[0].parent
