"""KVzap: predicted reconstruction scores with per-head keeps from one global ranking, plus bits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptive_kv.plan import Plan
from adaptive_kv.predicted_reconstruction import PREDICTED_SCORER, ReconstructionPredictor, load_predictor
from adaptive_kv.policies.kvzip import KVzip
from adaptive_kv.policies.registry import register
from adaptive_kv.stats import AttentionStats, StatsConfig

# The scorer fitted for the embedded model ships beside its controller.
SHIPPED = Path(__file__).resolve().parent / "controller" / "shipped" / "smollm2-135m"
FLOORS = ("none", "window")


@register("kvzap")
@dataclass(frozen=True)
class KVzap(KVzip):
    """KVzip's allocation over predicted reconstruction scores (after KVzap, arXiv:2601.07891).

    A small per-layer model (`ReconstructionPredictor`, files in `path`; default the one shipped
    for the embedded model) predicts each token's reconstruction score from the hidden states the
    prefill computes anyway, so there is no second pass over the context; the scores then compete
    in one global ranking and kept tokens are stored at `key_bits` / `value_bits`, as in `kvzip`.
    A request far from the context lengths the predictor was fitted on is planned the same way,
    and the plan's note says its scores are extrapolated.

    `floor="window"` raises each token's predicted score to the attention the prefill's recent
    window gave it (summed over the window's queries): a token the context's end reads is kept
    even where the predictor ranks it low.
    """

    scorer: str = PREDICTED_SCORER
    path: str | None = None
    floor: str = "none"
    predictor: ReconstructionPredictor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scorer != PREDICTED_SCORER:
            raise ValueError(f"kvzap ranks by {PREDICTED_SCORER!r}; for another scorer use kvzip's scorer option")
        if self.floor not in FLOORS:
            raise ValueError(f"kvzap floor must be one of {FLOORS}, got {self.floor!r}")
        object.__setattr__(self, "predictor", load_predictor(self.path if self.path is not None else SHIPPED))

    def stats_config(self) -> StatsConfig:
        """The layout's statistics plus the predictor, which scores tokens inside the prefill."""
        return dataclasses.replace(super().stats_config(), predictor=self.predictor)

    def weights_digest(self) -> str:
        """The digest of the scorer it reads: a scorer refitted in the same folder is another policy."""
        return self.predictor.digest

    def plan(self, stats: AttentionStats, budget: float) -> Plan:
        """KVzip's plan over the predicted scores, noting when they are extrapolated."""
        return super().plan(stats, budget).noted(self.predictor.extrapolated(stats.seq_len))

    def plan_uniform(self, stats: AttentionStats, budget: float) -> Plan:
        """KVzip's allocation of the predicted scores, floored as `floor` says."""
        if self.floor == "window":
            scores = stats.token_scores
            floored = torch.maximum(scores[PREDICTED_SCORER], scores["window"].to(scores[PREDICTED_SCORER].dtype))
            stats = dataclasses.replace(stats, token_scores={**scores, PREDICTED_SCORER: floored})
        return super().plan_uniform(stats, budget)

