"""The search objective as a plain function: trial config -> controller + validation metrics.

Cheap but real: validation requests are prefilled once (captured), and each budget's plan is
applied by forking that prefill; the ids that follow are teacher-forced. A task request scores
the likelihood of its reference answer relative to the uncompressed cache, 100 x exp(min(0,
mean over answer tokens of log p_compressed - log p_full)): 100 when compression costs the answer
nothing, falling as the answer becomes less likely. Unlike "every answer token is the top choice",
this separates plans even where the uncompressed model misses the exact answer (most 1k NIAH
answers for a 135M model), so NIAH and variable tracking weigh in the search beside passkey.
Natural text scores the top-1 agreement with the uncompressed cache.

The `generated` objective scores a task request as `eval` does instead: the answer generated greedily
from the compressed cache (the question fed after compression under query_agnostic), scored by the
task's metric. The likelihood ratio can sit near 100 for two plans whose generated answers differ
(it averages over every answer token); the generated score is the figure users read, coarser per
request (0 or 100 on most tasks). No Ray, Optuna or MLflow here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from adaptive_kv.cache import CompressedCache
from adaptive_kv.decode import decode
from adaptive_kv.model_identity import ModelIdentity
from adaptive_kv.plan import Layout, Plan
from adaptive_kv.policies.controller.files import ControllerConfig
from adaptive_kv.policies.learned import RECONSTRUCTION_SOURCES, Learned
from adaptive_kv.predicted_reconstruction import load_predictor
from adaptive_kv.policies.controller.options import DEFAULT_BITS, DEFAULT_KEEPS, option_grid
from adaptive_kv.policies.controller.trained_range import TrainedRange
from adaptive_kv.stats import FEATURE_NAMES, GLOBAL_SHARE_FRACTIONS, RECONSTRUCTION_FEATURES, StatsConfig
from adaptive_kv.tasks.scoring import METRICS
from adaptive_kv.training.calibration import CalibrationRequest
from adaptive_kv.training.fit import FitConfig, fit
from adaptive_kv.training.labels import LabelTarget, RequestLabels, capture_reading

# option_grid arguments: uniform keeps, their bits[, global keeps, their bits]
GRIDS: dict[str, tuple] = {
    "default": (DEFAULT_KEEPS, DEFAULT_BITS),
    "fine": ((None, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0625, 0.0), DEFAULT_BITS),
    "no8bit": (DEFAULT_KEEPS, ((16, 16), (4, 4), (4, 2), (2, 2))),
    # the default grid plus a global allocation's keeps (KVzip's per-head counts) at every bit pair
    "global": (DEFAULT_KEEPS, DEFAULT_BITS, GLOBAL_SHARE_FRACTIONS, DEFAULT_BITS),
}
# how a validation task request is scored (module docstring); natural text is top-1 agreement under both
OBJECTIVES = ("likelihood", "generated")
# new tokens a generated validation answer may take (the answers are a few tokens; `eval`'s range rows
# cap at 12-32): a wrong answer runs to the cap, a right one stops when it is complete
GENERATED_TOKENS_CAP = 32


@dataclass(frozen=True)
class TrialConfig:
    """One point of the search space: cache layout, option grid, network, optimisation, weighting."""

    sink_tokens: int = 4
    recent_window: int = 32
    group_size: int = 32
    scorer: str = "reconstruction"
    selection: str = "per_head"
    grid: str = "default"
    hidden: int = 64
    layers: int = 2
    embedding: int = 8
    layer_weight_slope: float = 0.0  # > 0 weighs early layers' distortion more (their errors propagate), < 0 later ones
    label_rows: str = "answer"
    label_error: str = "residual"
    fit: FitConfig = field(default_factory=FitConfig)
    # where the reconstruction scores and features come from: the exact pass, or the predictor in
    # `scorer_path` (the controller then decides without a second pass)
    reconstruction: str = "exact"
    scorer_path: str | None = None
    # what the validation score (the search's objective) measures; fixed by the training, not searched
    objective: str = "likelihood"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {tuple(GRIDS)}, got {self.grid!r}")
        self.label_target()  # validates label_rows and label_error
        if self.reconstruction not in RECONSTRUCTION_SOURCES:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_SOURCES}, got {self.reconstruction!r}")
        if (self.reconstruction == "predicted") != (self.scorer_path is not None):
            raise ValueError("reconstruction='predicted' needs scorer_path (a scorer folder), and only it does")

    def label_target(self) -> LabelTarget:
        """What the labels measure."""
        return LabelTarget(rows=self.label_rows, error=self.label_error)

    def layout(self) -> Layout:
        """The cache layout of this trial's plans."""
        return Layout(self.sink_tokens, self.recent_window, self.group_size, self.scorer, self.selection)

    def layout_key(self) -> str:
        """Labels depend on layout, grid and label target only; trials sharing them share labels."""
        return (f"s{self.sink_tokens}-w{self.recent_window}-g{self.group_size}-{self.scorer}-{self.selection}-{self.grid}"
                f"-{self.label_rows}-{self.label_error}" + ("-predicted" if self.reconstruction == "predicted" else ""))

    def stats_config(self) -> StatsConfig:
        """What the cache reads: reconstruction scores always (their features help every scorer), exact or predicted."""
        if self.reconstruction == "predicted":
            return StatsConfig(sink_tokens=self.sink_tokens, group_size=self.group_size,
                               predictor=load_predictor(self.scorer_path))
        return StatsConfig(sink_tokens=self.sink_tokens, group_size=self.group_size, reconstruction=True)

    def options(self):
        """The option grid."""
        return option_grid(*GRIDS[self.grid])

    def to_params(self) -> dict[str, Any]:
        """Flat parameters for logging, the fit's fields unprefixed so every searched knob has the name
        Optuna gives it (`lr`, `epochs`, `loss`; `search.suggest`)."""
        data = asdict(self)
        fit = data.pop("fit")
        assert not set(fit) & set(data), "fit and trial fields share a name"
        return {**data, **fit}


def layer_weights(num_layers: int, slope: float) -> tuple[float, ...]:
    """exp(slope x (1 - 2 l / (L - 1))): 1 everywhere at slope 0, early layers heavier for slope > 0."""
    span = max(1, num_layers - 1)
    return tuple(math.exp(slope * (1 - 2 * l / span)) for l in range(num_layers))


def controller_config(trial: TrialConfig, model, model_name: str) -> ControllerConfig:
    """The controller's config for this trial and model."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = dict(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim)
    return ControllerConfig(
        model_shape=shape, feature_names=FEATURE_NAMES + RECONSTRUCTION_FEATURES, grid=trial.options(),
        layout=trial.layout(), layer_weights=layer_weights(shape["num_layers"], trial.layer_weight_slope),
        hidden=trial.hidden, layers=trial.layers, embedding=trial.embedding, model_name=model_name,
        notes={"reconstruction": trial.reconstruction},
        base_model=ModelIdentity.of(cfg, model_name),  # recorded: the controller is refused on other models
    )


@dataclass
class ValidationItem:
    """A validation request with its captured prefill, last prefill logits and reference logits."""

    request: CalibrationRequest
    captured: CompressedCache
    last_logits: torch.Tensor  # (1, V)
    reference: torch.Tensor  # (Q, V) logits of the follow ids over the uncompressed fork


@torch.inference_mode()
def prepare_validation(model, tokenizer, requests: list[CalibrationRequest], stats_config: StatsConfig,
                       layout: Layout) -> list[ValidationItem]:
    """Prefill every validation request once (`capture_reading`: predicted scores under the exact names)."""
    items = []
    for request in requests:
        prefill = capture_reading(model, tokenizer, request.context_ids, stats_config)
        captured, last_logits = prefill.cache, prefill.last_logits
        identity = captured.fork(Plan.full(captured.num_layers, captured.num_kv_heads, **layout.keywords(), windows=captured.windows))
        reference = model(torch.tensor([list(request.follow_ids)], device=model.device), cache=identity).logits[0]
        items.append(ValidationItem(request, captured, last_logits, reference))
    return items


def answer_log_likelihood(last_logits: torch.Tensor, logits: torch.Tensor, follow: torch.Tensor,
                          answer_tokens: int) -> torch.Tensor:
    """Log-probability (A,) of each of the last `answer_tokens` of `follow` (Q,), teacher-forced:
    `last_logits` (1, V) predicts follow[0], logits row j (Q, V) predicts follow[j + 1]."""
    rows = torch.cat([last_logits, logits[:-1]])[-answer_tokens:].float().log_softmax(-1)
    return rows.gather(1, follow[-answer_tokens:, None]).squeeze(1)


def answer_score(compressed: torch.Tensor, full: torch.Tensor) -> float:
    """100 x exp(min(0, mean(compressed - full))) from per-token answer log-likelihoods."""
    return 100.0 * math.exp(min(0.0, (compressed - full).mean().item()))


@torch.inference_mode()
def score_plan(model, item: ValidationItem, plan: Plan) -> float:
    """Teacher-forced score of one plan on one validation item, in 0-100 (module docstring)."""
    cache = item.captured.fork(plan)
    follow = torch.tensor([list(item.request.follow_ids)], device=model.device)
    logits = model(follow, cache=cache).logits[0]  # (Q, V): row j predicts follow[j + 1]
    count = item.request.answer_tokens
    if count == 0:
        return 100.0 * (logits[:-1].argmax(-1) == item.reference[:-1].argmax(-1)).float().mean().item()
    compressed = answer_log_likelihood(item.last_logits, logits, follow[0], count)
    return answer_score(compressed, answer_log_likelihood(item.last_logits, item.reference, follow[0], count))


@torch.inference_mode()
def generated_score(model, tokenizer, item: ValidationItem, plan: Plan) -> float:
    """The greedy answer from one plan's cache scored by the task's metric (0-100), as `eval` scores
    it; natural text (no answer) is scored by `score_plan`."""
    request = item.request
    if request.answer_tokens == 0:
        return score_plan(model, item, plan)
    if request.metric not in METRICS or not request.answers or request.max_new_tokens < 1:
        raise ValueError(f"request {request.key} cannot be scored on a generated answer: it needs answers, a metric "
                         f"in {sorted(METRICS)} and max_new_tokens >= 1 (got {request.answers!r}, {request.metric!r}, "
                         f"{request.max_new_tokens})")
    metric = METRICS[request.metric]
    cache = item.captured.fork(plan)
    first = item.last_logits
    question = request.follow_ids[:-request.answer_tokens]
    if question:  # query_agnostic: the question arrives after compression
        first = model(torch.tensor([list(question)], device=model.device), cache=cache).logits[:, -1]

    def score(tokens: list[int]) -> float:
        return metric(tokenizer.decode(tokens, skip_special_tokens=True), request.answers)

    eos = {t for t in [tokenizer.eos_token_id] if t is not None}
    limit = min(request.max_new_tokens, GENERATED_TOKENS_CAP)
    # containment scores cannot drop when more text follows: stop once the answer is complete
    tokens = decode(model, cache, first, limit, eos=eos, on_token=lambda toks: score(toks) >= 100).tokens
    return score(tokens)


def evaluate_policy(model, items: list[ValidationItem], plan_for: Callable, budgets: tuple[float, ...],
                    objective: str = "likelihood", tokenizer=None) -> dict[str, Any]:
    """Scores of `plan_for(stats, budget)` per budget and task, plus real byte fractions.

    `objective` says how a task request is scored (`OBJECTIVES`; "generated" needs `tokenizer`).

    `score` (the search objective) counts a request whose budget is below the policy's reach as 0, so
    the search prefers controllers that always plan. The reported means leave such requests out:
    `by_budget[b]` is the mean over feasible requests, None when none was (as `eval` reports an
    infeasible budget), and `infeasible[b]` counts them. `samples` / `sample_bytes` hold each feasible
    request's score and byte fraction per "task/budget" key (intervals of the summary table).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "generated" and tokenizer is None:
        raise ValueError("objective 'generated' decodes answers to text: give the tokenizer")
    out: dict[str, Any] = {"objective": objective, "by_budget": {}, "by_task": {}, "bytes_fraction": {},
                           "infeasible": {}, "samples": {}, "sample_bytes": {}}
    per_budget = []
    for budget in budgets:
        scores, fractions, infeasible = [], [], 0
        for item in items:
            try:
                plan = plan_for(item.captured.stats, budget)
            except ValueError:  # below this policy's reach
                infeasible += 1
                continue
            score = (score_plan(model, item, plan) if objective == "likelihood"
                     else generated_score(model, tokenizer, item, plan))
            scores.append(score)
            shape = item.captured.stats
            seq_len, head_dim, itemsize = shape.seq_len, shape.head_dim, shape.dtype_bytes
            fraction = plan.nbytes(seq_len, head_dim, itemsize) / plan.full_nbytes(seq_len, head_dim, itemsize)
            fractions.append(fraction)
            out["samples"].setdefault(f"{item.request.task}/{budget:g}", []).append(score)
            out["sample_bytes"].setdefault(f"{item.request.task}/{budget:g}", []).append(fraction)
        out["by_budget"][budget] = sum(scores) / len(scores) if scores else None
        out["bytes_fraction"][budget] = sum(fractions) / len(fractions) if fractions else None
        out["infeasible"][budget] = infeasible
        per_budget.append(sum(scores) / len(items))
    out["by_task"] = {k: sum(v) / len(v) for k, v in out["samples"].items()}
    out["score"] = sum(per_budget) / len(budgets)
    return out


def run_trial(model, trial: TrialConfig, train: list[RequestLabels], valid: list[RequestLabels],
              items: list[ValidationItem], budgets: tuple[float, ...], *, model_name: str = "",
              on_epoch: Callable | None = None, tokenizer=None) -> tuple[ControllerConfig, Any, dict[str, Any]]:
    """Fit a controller for `trial` and score it end to end. Returns (config, net, metrics)."""
    config = controller_config(trial, model, model_name)
    # the lengths and budgets it learns from: outside them `learned` plans with kvzip's allocation
    trained = TrainedRange.of([labels.seq_len for labels in train + valid], budgets)
    config = dataclasses.replace(config, notes={**config.notes, "trained_range": trained.to_notes()})
    net, fit_metrics = fit(config, trial.fit, train, valid, on_epoch)
    policy = Learned.from_parts(config, net)
    result = evaluate_policy(model, items, policy.plan, budgets, trial.objective, tokenizer)
    result.update(fit_metrics)
    return config, net, result
