"""Learned controllers in the MLflow model registry: where the store is, and fetching a registered controller.

Training registers controllers (`adaptive_kv.training.tracking`); the service loads them by URI.
Both reach the store through here, so the service needs no part of training. mlflow is imported
only when a registry URI is fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from adaptive_kv.model_identity import ModelIdentity

DEFAULT_DIR = Path("mlruns")
DEFAULT_REGISTERED_MODEL = "adaptive-kv-controller"
EMBEDDED_MODEL = "smollm2-135m"  # adaptive_kv.models.DEFAULT_MODEL (not imported: it loads transformers)
# registered model tags: which base model a registered model's controllers were trained for
BASE_MODEL_TAG, BASE_MODEL_FINGERPRINT_TAG = "base_model", "base_model_fingerprint"


def registered_model_name(base_model: ModelIdentity) -> str:
    """The registered model holding the controllers of `base_model`: one per base model, so its @champion is
    the champion for that model only and a champion of another model never replaces it or is served for it.

    The embedded model keeps the plain name (the compose service and the quickstart load
    models:/adaptive-kv-controller@champion); any other model's adds its folder's name and the first 8 digits
    of its config fingerprint, so two folders of one name, or a folder whose config changed, stay apart.
    """
    if base_model.name.lower() == EMBEDDED_MODEL:
        return DEFAULT_REGISTERED_MODEL
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(base_model.name).name).strip("-.")[:48] or base_model.model_type
    return f"{DEFAULT_REGISTERED_MODEL}-{slug}-{base_model.fingerprint[:8]}"


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns. A bare folder (no scheme)
    becomes a SQLite store in it: MLflow 3 refuses a folder as a file store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or str(DEFAULT_DIR)
    if "://" in uri or uri.startswith(("databricks", "uc:")):
        return uri
    folder = Path(uri).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def bind_registered_model(name: str, base_model: ModelIdentity) -> None:
    """In the active MLflow store, create registered model `name` for `base_model`'s controllers, or check that
    it holds that model's: one tagged for another base model raises ValueError naming both, so a champion
    of one model is never compared with or replaced by another's. One registered before the tag existed is
    tagged now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    tags = {BASE_MODEL_TAG: base_model.describe(), BASE_MODEL_FINGERPRINT_TAG: base_model.fingerprint}
    try:
        current = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, tags=tags)
            return
        except MlflowException as race:  # another trainer created it a moment ago: check its tag below
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            current = client.get_registered_model(name)
    bound = current.tags.get(BASE_MODEL_FINGERPRINT_TAG)
    if bound is None:
        for key, value in tags.items():
            client.set_registered_model_tag(name, key, value)
    elif bound != base_model.fingerprint:
        raise ValueError(f"registered model {name!r} holds controllers of {current.tags.get(BASE_MODEL_TAG, bound)}, "
                         f"not of {base_model.describe()}: register this one in another MLflow store")


def fetch_controller(uri: str, tracking: str | None = None) -> Path:
    """A local controller folder for `uri`: a folder path, or an MLflow model URI (models:/name@alias)."""
    if not uri.startswith(("models:/", "runs:/")):
        folder = Path(uri)
        if not (folder / "controller.json").is_file():
            raise ValueError(f"policy-uri {uri!r} is neither an MLflow model URI nor a controller folder")
        return folder
    import mlflow

    store = tracking_uri(tracking)
    mlflow.set_tracking_uri(store)
    try:
        local = _download_once(uri, store)
    except Exception as exc:  # MLflow raises several types for unknown names, aliases and stores
        raise ValueError(f"cannot fetch {uri!r} from {store}: {exc}") from None
    found = sorted(local.rglob("controller.json"))
    if not found:
        raise ValueError(f"{uri!r} holds no controller.json")
    return found[0].parent


def _resolved(uri: str) -> str:
    """What `uri` points at now: an alias resolved to its model version (an alias moves; a version and
    a run's artifacts never change, so a download of either is kept and reused)."""
    from mlflow import MlflowClient

    body = uri[len("models:/"):] if uri.startswith("models:/") else ""
    if "@" in body:
        name, alias = body.split("@", 1)
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return uri


def _download_once(uri: str, store: str) -> Path:
    """The artifacts of `uri` in a cache folder per (store, resolved version): downloaded into a
    temporary sibling and renamed into place, so a reload reuses a finished download and never leaves
    a folder per call behind."""
    import hashlib
    import shutil
    import tempfile

    import mlflow

    from adaptive_kv.models import resolve_cache_dir

    root = resolve_cache_dir() / "controllers"
    root.mkdir(parents=True, exist_ok=True)
    resolved = _resolved(uri)  # downloaded as resolved: an alias moving meanwhile cannot mix versions
    target = root / hashlib.sha256(f"{store}|{resolved}".encode()).hexdigest()[:24]
    if target.is_dir():
        return target
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=resolved, dst_path=str(partial))
        os.replace(partial, target)
    except OSError:
        if not target.is_dir():  # not a concurrent fetch of the same version that finished first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
