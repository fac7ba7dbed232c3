"""Policies by name: `register` at definition, `get_policy(name, **options)` to build one."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from adaptive_kv.policies.base import Policy

_POLICIES: dict[str, type[Policy]] = {}


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator adding a Policy dataclass to the registry under `name`."""

    def add(cls: type[Policy]) -> type[Policy]:
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise ValueError(f"policy name {name!r} is already registered to {_POLICIES[name].__name__}")
        _POLICIES[name] = cls
        return cls

    return add


def available_policies() -> tuple[str, ...]:
    """Names of every registered policy, sorted."""
    return tuple(sorted(_POLICIES))


def get_policy(name: str, **options: Any) -> Policy:
    """Build the policy `name` with its options; unknown names or options raise ValueError."""
    if name not in _POLICIES:
        raise ValueError(f"policy must be one of {available_policies()}, got {name!r}")
    cls = _POLICIES[name]
    fields = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {unknown}; its options are {fields}")
    return cls(**options)
