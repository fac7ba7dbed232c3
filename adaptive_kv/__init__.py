"""adaptive-kv: hybrid, adaptive KV-cache compression (per-head eviction + quantisation).

Public API: `load_model`, `Plan`, `HeadBudget`, `Layout`, `CompressedCache`, `AttentionStats`, `capture`
(the prefill; the decode loop is `adaptive_kv.decode.decode`), `generate`, `InfeasibleBudget`.
Names are resolved lazily so `import adaptive_kv` stays cheap and loads no optional stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Plan": "adaptive_kv.plan",
    "HeadBudget": "adaptive_kv.plan",
    "Layout": "adaptive_kv.plan",
    "InfeasibleBudget": "adaptive_kv.errors",
    "capture": "adaptive_kv.prefill",
    "Captured": "adaptive_kv.prefill",
    "AttentionStats": "adaptive_kv.stats",
    "CompressedCache": "adaptive_kv.cache",
    "generate": "adaptive_kv.generation",
    "GenerationResult": "adaptive_kv.generation",
    "load_model": "adaptive_kv.models",
    "DEFAULT_MODEL": "adaptive_kv.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adaptive_kv' has no attribute {name!r}")
