"""Where the service's policy comes from: a registered name, a local controller folder, or the MLflow registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adaptive_kv.policies import Policy, get_policy
from adaptive_kv.policies.controller import registry

REGISTRY_SCHEME = "models:/"
LEARNED = "learned"


@dataclass(frozen=True)
class PolicySpec:
    """What to load: a registered policy `name`, or a learned controller at `uri` (folder or models:/...)."""

    name: str = "hybrid"
    uri: str | None = None
    reconstruction: str = "auto"  # the learned controller's reconstruction source (`Learned.reconstruction`)

    def describe(self) -> str:
        """The name reported in responses: the policy, and its source when it is a controller."""
        base = self.name if self.uri is None else f"{LEARNED}:{self.uri}"
        return base if self.reconstruction == "auto" else f"{base}:reconstruction={self.reconstruction}"


@dataclass(frozen=True)
class LoadedPolicy:
    """A built policy and the spec it came from."""

    spec: PolicySpec
    policy: Policy
    source: str  # the local folder or name actually loaded (an alias resolves to a version's folder)


def fetch_registered(uri: str) -> Path:
    """Download the controller registered at `uri` (models:/NAME@ALIAS or /VERSION) to a local folder."""
    try:
        return Path(registry.fetch_controller(uri))
    except ImportError as exc:  # mlflow (the serve extra) is missing
        raise ValueError(f"policy_uri {uri!r} needs mlflow to fetch a registered controller: {exc}") from exc


def resolve_policy(spec: PolicySpec) -> LoadedPolicy:
    """Build the policy `spec` names; ValueError with a clear message when it cannot."""
    if spec.uri is None:
        options = {"reconstruction": spec.reconstruction} if spec.name == LEARNED else {}
        return LoadedPolicy(spec, get_policy(spec.name, **options), spec.name)
    if spec.uri.startswith(REGISTRY_SCHEME):
        folder = fetch_registered(spec.uri)
    else:
        folder = Path(spec.uri).expanduser()
        if not folder.is_dir():
            raise ValueError(f"policy_uri {spec.uri!r} is neither {REGISTRY_SCHEME}NAME@ALIAS nor an existing folder")
    return LoadedPolicy(spec, get_policy(LEARNED, path=str(folder), reconstruction=spec.reconstruction), str(folder))
