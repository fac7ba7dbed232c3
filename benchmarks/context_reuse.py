"""Compress once, ask many times: a document compressed once and reused by ten questions.

Embedded SmolLM2-135M (fp32, CPU). Each document is a RULER-style haystack of `--length` tokens
holding `--questions` needles (one key and one 7-digit number each); each question asks for one
key's number (scored by string match, as RULER's niah tasks). Three measurements:

- accuracy: every question over the document compressed once without it (query-agnostic: the plan
  is decided on the document alone, and each question decodes over a `share()` copy of it, as the
  service's stored contexts do) vs each question compressed with the document (query-aware: one
  prefill per question). One capturing prefill per document (and per question for the query-aware
  protocol) serves every policy and budget. 95 % bootstrap intervals over the questions.
- time to first token in the engine (`--reuse-contexts`, the service's code path, in-process):
  questions 2.. over the stored document vs fresh requests that prefill document and question.
- capacity: the bytes of one stored compressed document, and how many fit in 1 GiB, vs the full cache.

Writes benchmarks/results/<output>.{json,md}.

    python benchmarks/context_reuse.py [--length 4096] [--documents 2] [--questions 10]
        [--policies learned kvzip snapkv] [--budgets 0.25 0.125 0.0625] [--ttft-policies learned kvzip]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptive_kv import load_model
from adaptive_kv.decode import decode, end_tokens
from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.evaluation import bootstrap_interval
from adaptive_kv.policies import get_policy
from adaptive_kv.prefill import capture, needs_of
from adaptive_kv.tasks.base import PieceEncoder, TaskSample
from adaptive_kv.tasks.niah import NiahTask, NiahVariant
from adaptive_kv.tasks.scoring import score_sample

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = (NiahVariant("prose", "words", "numbers"),)
MAX_NEW_TOKENS = 32
GIB = 2**30


@dataclass(frozen=True)
class Document:
    context_ids: tuple[int, ...]
    questions: tuple[TaskSample, ...]  # one per needle, each with the document as its context


def documents(tokenizer, length: int, count: int, questions: int, seed: int) -> list[Document]:
    """`count` haystacks of `length` tokens with `questions` needles, and one single-key question per needle."""
    encoder = PieceEncoder(tokenizer)
    every_key = NiahTask("niah_reuse", VARIANTS, num_keys=questions, num_queries=questions)
    one_key = NiahTask("niah_reuse", VARIANTS, num_keys=questions)  # its singular question template
    docs = []
    for index in range(count):
        sample = every_key.build(encoder, length, seed, index)
        variant = VARIANTS[(seed + index) % len(VARIANTS)]
        asked = []
        for key, value in zip(sample.metadata["query_keys"], sample.answers):
            _, question, prefix = one_key._templates(variant, key)
            ids = tuple(encoder.encode(question) + encoder.encode(prefix))
            asked.append(TaskSample("niah_reuse", sample.context_ids, ids, (value,), MAX_NEW_TOKENS,
                                    "string_match_all", {"key": key}))
        docs.append(Document(sample.context_ids, tuple(asked)))
    return docs


# ---------------------------------------------------------------------------- accuracy
def _answer(model, tokenizer, eos, cache, first: torch.Tensor, sample: TaskSample) -> float:
    solved = lambda toks: score_sample(sample, tokenizer.decode(toks, skip_special_tokens=True)) >= 100  # noqa: E731
    tokens = decode(model, cache, first, MAX_NEW_TOKENS, eos=eos, on_token=solved).tokens
    return score_sample(sample, tokenizer.decode(tokens, skip_special_tokens=True))


@torch.inference_mode()
def accuracy(model, tokenizer, docs: list[Document], combos: list[tuple[str, float]], log) -> tuple[dict, dict]:
    """(scores, stored bytes) per (protocol, policy, budget)."""
    policies = {name: get_policy(name) for name, _ in combos}
    needs = needs_of(policies.values())
    eos = end_tokens(model, tokenizer)
    scores: dict[tuple, list[float]] = {}
    stored: dict[tuple, list[int]] = {}
    errors: dict[tuple, str] = {}

    def forks(captured):
        for name, budget in combos:
            try:
                yield (name, budget), captured.cache.fork(policies[name].plan(captured.cache.stats, budget))
            except InfeasibleBudget as exc:
                errors[(name, budget)] = str(exc)

    for d, doc in enumerate(docs):
        start = time.perf_counter()
        captured = capture(model, tokenizer, doc.context_ids, needs)
        for combo, shared in forks(captured):
            stored.setdefault(combo, []).append(shared.nbytes())
            stored.setdefault(("full",), []).append(shared.full_nbytes())
            for sample in doc.questions:
                cache = shared.share()
                first = model(torch.tensor([list(sample.question_ids)]), cache=cache).logits[:, -1]
                scores.setdefault(("query_agnostic", *combo), []).append(
                    _answer(model, tokenizer, eos, cache, first, sample))
        log(f"document {d}: query-agnostic done in {time.perf_counter() - start:.0f} s")
        for q, sample in enumerate(doc.questions):
            start = time.perf_counter()
            captured = capture(model, tokenizer, sample.prompt_ids, needs)
            for combo, cache in forks(captured):
                scores.setdefault(("query_aware", *combo), []).append(
                    _answer(model, tokenizer, eos, cache, captured.last_logits, sample))
            log(f"document {d} question {q}: query-aware done in {time.perf_counter() - start:.0f} s")
    return scores, {"stored": stored, "errors": errors}


# ---------------------------------------------------------------------------- time to first token
async def _first_token_s(engine, request) -> float:
    """Seconds from submission to the first event (the first token's text, or the output of a one-token request)."""
    start, first = time.perf_counter(), None
    async for _ in engine.generate(request):
        first = time.perf_counter() - start if first is None else first
    return first


def time_to_first_token(model, tokenizer, doc: Document, policy: str, budget: float, fresh: int, log) -> dict:
    """Seconds to the first token of each question: over the stored document (engine with reuse) and fresh."""
    from adaptive_kv.services.engine import Engine, EngineConfig, GenerationRequest
    from adaptive_kv.services.policy_source import PolicySpec

    def run(reuse: bool, samples) -> list[float]:
        engine = Engine(EngineConfig(model="smollm2-135m", policy=PolicySpec(name=policy), budget=budget,
                                     reuse_contexts=reuse, kv_memory=4 * GIB, request_timeout=3600,
                                     max_tokens_cap=MAX_NEW_TOKENS), loader=lambda name: (model, tokenizer))
        engine.start()
        try:
            times = []
            for sample in samples:
                request = GenerationRequest(sample.prompt_ids, 1, context_tokens=len(sample.context_ids) if reuse else 0)
                times.append(asyncio.run(_first_token_s(engine, request)))
                log(f"{policy} {'reuse' if reuse else 'fresh'}: {times[-1]:.2f} s")
            return times
        finally:
            engine.close()

    reused = run(True, doc.questions)
    fresh_s = run(False, doc.questions[:fresh])
    follow = reused[1:]
    return {"policy": policy, "budget": budget, "context_tokens": len(doc.context_ids),
            "first_question_s": reused[0], "followups_s": follow, "fresh_s": fresh_s,
            "followup_median_s": statistics.median(follow), "fresh_median_s": statistics.median(fresh_s),
            "ratio_median": statistics.median(follow) / statistics.median(fresh_s),
            "ratio_range": [min(follow) / max(fresh_s), max(follow) / min(fresh_s)]}


# ---------------------------------------------------------------------------- report
def _table(results: dict) -> str:
    lines = [f"# Context reuse: one {results['context_tokens']}-token document, {results['questions']} questions",
             "", f"`{results['command']}`", "",
             f"{results['documents']} documents x {results['questions']} questions = {results['samples_per_row']} "
             "samples a row; score 0-100 (string match), [95 % bootstrap interval].", "",
             "## Accuracy: compressed once (query-agnostic, reused) vs with each question (query-aware)", "",
             "| policy | budget | reused once | per question | bytes stored | stored per GiB |",
             "|---|---|---|---|---|---|"]
    full = results["full_bytes"]
    for row in results["accuracy"]:
        agn, awa = row["query_agnostic"], row["query_aware"]
        cell = lambda r: "infeasible" if r is None else f"{r['score']:.1f} [{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}]"  # noqa: E731
        fits = "" if row["stored_bytes"] is None else f"{GIB // row['stored_bytes']}"
        stored = "" if row["stored_bytes"] is None else f"{row['stored_bytes'] / 2**20:.2f} MiB"
        lines.append(f"| {row['policy']} | {row['budget']} | {cell(agn)} | {cell(awa)} | {stored} | {fits} |")
    lines += ["", f"Full cache of one document: {full / 2**20:.2f} MiB, {GIB // full} per GiB.", ""]
    if results["ttft"]:
        lines += ["## Time to first token in the engine (`--reuse-contexts`)", "",
                  "| policy | budget | first question (stores) | follow-ups median [min, max] | fresh median [min, max] "
                  "| follow-up / fresh |", "|---|---|---|---|---|---|"]
        for t in results["ttft"]:
            lines.append(f"| {t['policy']} | {t['budget']} | {t['first_question_s']:.2f} s | "
                         f"{t['followup_median_s']:.3f} s [{min(t['followups_s']):.3f}, {max(t['followups_s']):.3f}] | "
                         f"{t['fresh_median_s']:.2f} s [{min(t['fresh_s']):.2f}, {max(t['fresh_s']):.2f}] | "
                         f"{t['ratio_median']:.3f} [{t['ratio_range'][0]:.3f}, {t['ratio_range'][1]:.3f}] |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096, help="document + question tokens of the RULER build")
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", nargs="+", default=["learned", "kvzip", "snapkv"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125, 0.0625])
    parser.add_argument("--ttft-policies", nargs="*", default=["learned", "kvzip"])
    parser.add_argument("--ttft-budget", type=float, default=0.125)
    parser.add_argument("--ttft-fresh", type=int, default=3, help="fresh requests timed per policy")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--output", default="context_reuse")
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model, tokenizer = load_model("smollm2-135m")
    docs = documents(tokenizer, args.length, args.documents, args.questions, args.seed)
    results = {"command": "python benchmarks/context_reuse.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "context_tokens": len(docs[0].context_ids), "documents": args.documents, "questions": args.questions,
               "samples_per_row": args.documents * args.questions, "threads": torch.get_num_threads(),
               "accuracy": [], "ttft": [], "full_bytes": None}
    if not args.skip_accuracy:
        combos = [("full", 1.0)] + [(p, b) for p in args.policies for b in args.budgets]
        scores, info = accuracy(model, tokenizer, docs, combos, log)
        results["full_bytes"] = int(statistics.mean(info["stored"][("full",)]))
        for name, budget in combos:
            row = {"policy": name, "budget": budget, "error": info["errors"].get((name, budget))}
            for protocol in ("query_agnostic", "query_aware"):
                s = scores.get((protocol, name, budget))
                row[protocol] = None if not s else {"score": statistics.mean(s), "ci95": bootstrap_interval(s),
                                                    "n": len(s), "sample_scores": s}
            kept = info["stored"].get((name, budget))
            row["stored_bytes"] = int(statistics.mean(kept)) if kept else None
            results["accuracy"].append(row)
    for policy in args.ttft_policies:
        results["ttft"].append(time_to_first_token(model, tokenizer, docs[0], policy, args.ttft_budget,
                                                   args.ttft_fresh, log))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(results, indent=2) + "\n")
    if results["full_bytes"] is not None:
        (RESULTS / f"{args.output}.md").write_text(_table(results))
    print(_table(results) if results["full_bytes"] is not None else json.dumps(results["ttft"], indent=2))


if __name__ == "__main__":
    main()
