"""Offline evaluation: every policy x budget on the same prefills, scored at equal bytes.

Each sample's context is prefilled once into a capturing CompressedCache; every (policy, budget)
then forks it (compress a copy), answers and is scored. On 2 CPU cores this sharing is the
difference between minutes and hours. Two protocols (kvpress): `query_aware` compresses after the
question is in the prompt; `query_agnostic` compresses the context alone, then asks.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from adaptive_kv.cache import CompressedCache
from adaptive_kv.decode import decode
from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.eval_progress import identity_of, read_progress, write_progress
from adaptive_kv.plan import Plan
from adaptive_kv.prefill import Captured, capture, needs_of
from adaptive_kv.tasks import TASKS, TaskSample, kl_divergence, make_samples, perplexity, score_sample, top1_agreement

PROTOCOLS = ("query_aware", "query_agnostic")
REFERENCE_POLICY = "full"


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; validated so bad arguments fail before any prefill."""

    policies: tuple[str, ...]
    budgets: tuple[float, ...]
    tasks: tuple[str, ...]
    context_length: int = 1024
    samples: int = 5
    protocol: str = "query_agnostic"
    seed: int = 0
    max_new_tokens: int | None = None  # cap on the tasks' own answer lengths (RULER: 128 for NIAH)
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, max_context: int | None, known_policies: tuple[str, ...]) -> None:
        """Raise ValueError naming the first bad value and the allowed ones."""
        for spec in self.policies:
            name, options = parse_policy_spec(spec)
            if name not in known_policies:
                raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(known_policies)}")
            if options.get("planning", PLANNINGS[0]) not in PLANNINGS:
                raise ValueError(f"planning in {spec!r} must be one of {', '.join(PLANNINGS)}")
        for name in self.tasks:
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
        for budget in self.budgets:
            if not 0 < budget <= 1:
                raise ValueError(f"budget {budget} must be in (0, 1]")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} must be one of {', '.join(PROTOCOLS)}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if max_context is not None and not 1 <= self.context_length <= max_context:
            raise ValueError(f"context_length {self.context_length} must be in [1, {max_context}] for this model")


# how a spec's plan is made: by `policy.plan` after the whole prefill, or layer by layer as bounded
# prefill does (`policy.plan_per_layer`; e.g. 'snapkv:planning=per_layer'); one prefill serves both
PLANNINGS = ("end_of_prefill", "per_layer")


BOOTSTRAP_RESAMPLES = 2000


def run_identity(model_name: str, config: EvalConfig, policies: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the one it continues: every setting but the sample count,
    and the weights of every trained policy (a controller retrained in the same folder is another policy)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "samples"}
    weights = {spec: policy.weights_digest() for spec, policy in policies.items()}
    return identity_of({"model": model_name, **settings,
                        "policy_weights": {spec: d for spec, d in weights.items() if d is not None}})


def build_policies(config: EvalConfig, catalog: "PolicyCatalog") -> tuple[dict[str, Any], dict[str, str]]:
    """Each spec's policy (the full cache's too) and how its plan is made (`PLANNINGS`)."""
    policies, planning = {}, {}
    for spec in config.policies:
        name, options = parse_policy_spec(spec)
        planning[spec] = options.pop("planning", PLANNINGS[0])
        policies[spec] = catalog.get_policy(name, **{**config.policy_options.get(spec, {}), **options})
    if REFERENCE_POLICY not in policies:
        policies[REFERENCE_POLICY] = catalog.get_policy(REFERENCE_POLICY)
    return policies, planning


def bootstrap_interval(scores: list[float], level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval [low, high] of the mean of `scores` (resampled with a fixed seed)."""
    values = torch.tensor(scores, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = values[torch.randint(0, len(scores), (BOOTSTRAP_RESAMPLES, len(scores)), generator=gen)].mean(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [round(low, 4), round(high, 4)]


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'name' or 'name:opt=value:opt=value' (e.g. 'tova:selection=shared') -> (name, options).

    Values are parsed as int, then float, else kept as text; the whole spec labels the records,
    so one policy can be compared with itself under other options.
    """
    name, *pairs = spec.split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"policy option {pair!r} in {spec!r} must look like name=value")
        for cast in (int, float):
            try:
                options[key] = cast(text)
                break
            except ValueError:
                continue
        else:
            options[key] = text
    return name, options


@dataclass
class _Tally:
    scores: list[float] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    full_bytes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what plans said about themselves (Plan.note)
    extra: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"extra": dict(self.extra)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "_Tally":
        return cls(**{**data, "extra": defaultdict(list, data["extra"])})


def _copy_outcome(source: _Tally, target: _Tally) -> None:
    """The latest sample's bytes, score and per-sample metrics of `source`, appended to `target`."""
    for name in ("kv_bytes", "full_bytes", "scores"):
        getattr(target, name).append(getattr(source, name)[-1])
    for key, values in source.extra.items():
        if key != "prefill_s":  # what the policy itself pays, recorded for each policy
            target.extra[key].append(values[-1])


class PolicyCatalog(Protocol):
    """Where policies come from by name (the `adaptive_kv.policies` package is one)."""

    def available_policies(self) -> tuple[str, ...]: ...

    def get_policy(self, name: str, **options: Any) -> Any: ...


class Evaluator:
    """Runs an EvalConfig on one model with policies from `catalog`; `run()` returns the results.json dict."""

    def __init__(self, model, tokenizer, config: EvalConfig, *, catalog: PolicyCatalog, model_name: str,
                 progress: Callable | None = None):
        config.validate(getattr(model.config, "max_position_embeddings", None), catalog.available_policies())
        self.model, self.tokenizer, self.config, self.model_name = model, tokenizer, config, model_name
        self.policies, self.planning = build_policies(config, catalog)
        self.eos = {t for t in [tokenizer.eos_token_id] if t is not None}
        self.progress = progress or (lambda: None)
        # one prefill serves every policy: it reads what all of them need (one reconstruction pass at most)
        self.needs = needs_of(self.policies.values())

    def combos(self) -> list[tuple[str, float]]:
        """(policy, budget) pairs run on every sample; the full cache once, at budget 1."""
        pairs = [(p, b) for p in self.config.policies if p != REFERENCE_POLICY for b in self.config.budgets]
        return [(REFERENCE_POLICY, 1.0)] + pairs

    def samples(self) -> dict[str, list[TaskSample]]:
        """Every task's samples, generated from the seed."""
        c = self.config
        return {t: make_samples(t, self.tokenizer, c.context_length, c.samples, c.seed) for t in c.tasks}

    def run(self, progress: Path | None = None, resume: bool = False) -> dict[str, Any]:
        """Evaluate everything; returns the results.json dict (schema in docs/ARCHITECTURE.md).

        With `progress`, the state after each sample is written there; `resume` continues from that
        file's samples (same settings; the sample count may grow) instead of starting over.
        """
        start = time.perf_counter()
        tallies: dict[tuple[str, float, str], _Tally] = defaultdict(_Tally)
        done: list[tuple[str, int]] = []
        spent = 0.0
        identity = self._identity()  # hashes trained policies' weights: once per run, not per sample
        if resume and progress is not None and progress.exists():
            state = read_progress(progress, identity, self.config.samples)
            tallies.update({tuple(t["key"]): _Tally.from_json(t["tally"]) for t in state["tallies"]})
            done, spent = [tuple(d) for d in state["done"]], state["seconds"]
        for task, samples in self.samples().items():
            for index, sample in enumerate(samples):
                if (task, index) in done:
                    for _ in self.combos():
                        self.progress()
                    continue
                self._run_sample(sample, tallies)
                done.append((task, index))
                if progress is not None:
                    write_progress(progress, identity, done,
                                   [(key, t.to_json()) for key, t in tallies.items()],
                                   spent + time.perf_counter() - start)
        return self._results(tallies, spent + time.perf_counter() - start)

    def _identity(self) -> dict[str, Any]:
        return run_identity(self.model_name, self.config, self.policies)

    def _plan(self, policy: str, budget: float, cache: CompressedCache) -> Plan:
        policy_obj = self.policies[policy]
        make = policy_obj.plan_per_layer if self.planning.get(policy) == "per_layer" else policy_obj.plan
        return make(cache.stats, budget)

    def _prefill(self, ids: tuple[int, ...]) -> Captured:
        return capture(self.model, self.tokenizer, ids, self.needs)

    def _compressed(self, prefill: Captured, task: str, tallies: dict):
        """(tally, cache) for every feasible (policy, budget) fork of one prefill; infeasible ones are recorded.

        Each tally also records the prefill seconds its policy pays: the reconstruction pass only
        for the policies that read it. A plan equal to one already run on this prefill is not run
        again: the cache executes only the plan and decoding is greedy, so its outcome is copied.
        """
        captured, seconds = prefill.cache, prefill.seconds
        plain = seconds - captured.reconstruction_seconds
        run: dict[Plan, _Tally] = {}
        for policy, budget in self.combos():
            tally = tallies[(policy, budget, task)]
            tally.extra["prefill_s"].append(seconds if self.policies[policy].stats_config().reconstruction else plain)
            try:
                plan = self._plan(policy, budget, captured)
            except InfeasibleBudget as exc:  # recorded, not fatal: the other budgets still run
                tally.errors.append(str(exc))
                self.progress()
                continue
            if plan.note:  # e.g. `learned` outside its trained range: the row is another rule's
                tally.notes.append(plan.note)
            executed = dataclasses.replace(plan, note=None)
            if executed in run:
                _copy_outcome(run[executed], tally)
                self.progress()
                continue
            cache = captured.fork(plan)
            tally.kv_bytes.append(cache.nbytes())
            tally.full_bytes.append(cache.full_nbytes())
            yield tally, cache
            run[executed] = tally
            self.progress()

    def _run_sample(self, sample: TaskSample, tallies: dict) -> None:
        if sample.task == "fidelity":
            return self._run_fidelity(sample, tallies)
        aware = self.config.protocol == "query_aware"
        prefill = self._prefill(sample.prompt_ids if aware else sample.context_ids)
        limit = min(sample.max_new_tokens, self.config.max_new_tokens or sample.max_new_tokens)
        # containment scores cannot drop when more text follows: stopping at a perfect score changes
        # no score and saves most of the decode time on CPU
        solved = lambda toks: score_sample(sample, self.tokenizer.decode(toks, skip_special_tokens=True)) >= 100  # noqa: E731
        for tally, cache in self._compressed(prefill, sample.task, tallies):
            first = prefill.last_logits
            if not aware:
                with torch.inference_mode():
                    question = torch.tensor([list(sample.question_ids)], device=self.model.device)
                    first = self.model(question, cache=cache).logits[:, -1]
            tokens = decode(self.model, cache, first, limit, eos=self.eos, on_token=solved).tokens
            tally.scores.append(score_sample(sample, self.tokenizer.decode(tokens, skip_special_tokens=True)))

    def _run_fidelity(self, sample: TaskSample, tallies: dict) -> None:
        """Teacher-forced continuation: KL and top-1 agreement vs the full cache, and perplexity."""
        prefill = self._prefill(sample.context_ids)
        continuation = torch.tensor([list(sample.continuation_ids)], device=self.model.device)
        reference = None
        for tally, cache in self._compressed(prefill, sample.task, tallies):
            with torch.inference_mode():
                logits = self.model(continuation, cache=cache).logits[0, :-1].float()
            reference = logits if reference is None else reference  # the full cache runs first
            tally.scores.append(top1_agreement(reference, logits))
            tally.extra["kl"].append(kl_divergence(reference, logits))
            tally.extra["perplexity"].append(perplexity(logits, continuation[0, 1:]))

    def _results(self, tallies: dict, seconds: float) -> dict[str, Any]:
        records = []
        for (policy, budget, task), t in tallies.items():
            record = {
                "policy": policy,
                "budget": budget,
                "task": task,
                "score": sum(t.scores) / len(t.scores) if t.scores else None,
                "n_samples": len(t.scores),
                "kv_bytes": int(sum(t.kv_bytes) / len(t.kv_bytes)) if t.kv_bytes else None,
                "full_kv_bytes": int(sum(t.full_bytes) / len(t.full_bytes)) if t.full_bytes else None,
            }
            if t.scores:
                record["score_ci95"] = bootstrap_interval(t.scores)
                record["sample_scores"] = [round(x, 4) for x in t.scores]
            if t.errors:
                record["infeasible_samples"], record["error"] = len(t.errors), t.errors[0]
            if t.notes:
                record["noted_samples"], record["note"] = len(t.notes), t.notes[0]
            for key, values in t.extra.items():
                record[key] = sum(values) / len(values)
            records.append(record)
        return {
            "model": self.model_name,
            "context_length": self.config.context_length,
            "protocol": self.config.protocol,
            "seed": self.config.seed,
            "samples_per_task": self.config.samples,
            "max_new_tokens_cap": self.config.max_new_tokens,
            "wall_time_s": round(seconds, 2),
            "records": records,
        }
