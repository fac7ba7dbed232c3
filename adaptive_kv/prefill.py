"""The prefill of one prompt: what the cache must read for the given policies, and the capturing forward.

A capturing prefill keeps the full-precision prefill and its statistics so that `fork(plan)` can
compress copies of it; every caller that plans after the prefill (evaluation, the `plan` command,
training's labels and validation, the service's plan endpoint and policy check, the benchmarks)
prefills through `capture` here, and every cache that plans during the prefill gets its inputs
from `cache_inputs`, so what a policy needs (statistics layout, reconstruction scores, any later
scorer) is decided in one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol, Sequence

import torch

from adaptive_kv.cache import CompressedCache
from adaptive_kv.reconstruction import ReconstructionRequest
from adaptive_kv.stats import StatsConfig


class ReadsStatistics(Protocol):
    """Anything that says what prefill statistics it plans from (every policy)."""

    def stats_config(self) -> StatsConfig: ...


def needs_of(policies: Iterable[ReadsStatistics]) -> StatsConfig:
    """The statistics one prefill must read so that every one of `policies` can plan from it.

    One prefill reads one layout (window, sinks, quantisation group): the layout the policies share,
    else the default one; reconstruction scores are read when any policy plans from them, and predicted
    ones when any policy's predictor does.
    """
    configs = [policy.stats_config() for policy in policies]
    layouts = {replace(config, reconstruction=False, predictor=None, trained_for=()) for config in configs}
    layout = layouts.pop() if len(layouts) == 1 else StatsConfig()
    # keyed by content: two controller folders each carrying a copy of one scorer share a prefill
    predictors: dict[str, Any] = {}
    for config in configs:
        if config.predictor is not None:
            predictors.setdefault(config.predictor.digest, config.predictor)
    if len(predictors) > 1:
        raise ValueError("one prefill runs one reconstruction predictor; these policies read different scorers")
    # every policy's files are checked against the model (two controllers of one model may be compared)
    trained_for = tuple(dict.fromkeys(files for config in configs for files in config.trained_for))
    return replace(layout, reconstruction=any(config.reconstruction for config in configs),
                   predictor=next(iter(predictors.values()), None), trained_for=trained_for)


def cache_inputs(tokenizer, ids: Sequence[int], needs: StatsConfig) -> dict[str, Any]:
    """The CompressedCache keywords that make its prefill of `ids` read `needs`.

    Reconstruction scores repeat the context, so they need its ids and the tokenizer's repeat prompts.
    """
    request = ReconstructionRequest.for_prompt(tokenizer, ids) if needs.reconstruction else None
    return {"stats_config": needs, "reconstruction": request}


@dataclass(frozen=True)
class Captured:
    """A capturing prefill: the cache to fork, the last position's logits (1, V) and the seconds it took."""

    cache: CompressedCache
    last_logits: torch.Tensor
    seconds: float


@torch.inference_mode()
def capture(model, tokenizer, ids: Sequence[int], needs: StatsConfig | None = None, **cache_options: Any) -> Captured:
    """Prefill `ids` into a capturing cache that reads `needs` (default: the default statistics).

    `cache_options` go to the cache (e.g. `backend`); the seconds include the reconstruction pass,
    whose own share is `cache.reconstruction_seconds`.
    """
    start = time.perf_counter()
    cache = CompressedCache(model, capture=True, **cache_inputs(tokenizer, ids, needs or StatsConfig()), **cache_options)
    # the last position only: a context's full logits would be its length x the vocabulary, held by any view of them
    logits = model(torch.tensor([list(ids)], device=model.device), cache=cache, logits_to_keep=1).logits[:, -1]
    return Captured(cache, logits, time.perf_counter() - start)
