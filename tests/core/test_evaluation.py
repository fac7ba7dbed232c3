"""Evaluation harness on a tiny model: schema, reports, shared prefills, CLI errors."""

import dataclasses
import json
import re

import pytest
import torch

from adaptive_kv import policies as catalog
from adaptive_kv.cli import main
from adaptive_kv.evaluation import EvalConfig, Evaluator
from adaptive_kv.report import best_per_budget, write_outputs

RECORD_KEYS = {"policy", "budget", "task", "score", "n_samples", "kv_bytes", "full_kv_bytes"}
# Tolerances, one table for the file. KL and perplexity of the evaluator vs computed in the test
# from a DynamicCache run and a directly compressed cache (fork == direct to 1e-6 in logits).
METRIC_RTOL = 1e-4
FIRST_LOGITS_ATOL = 1e-5  # full fork + question vs DynamicCache over the whole prompt (same SDPA)


@pytest.mark.parametrize("protocol", ["query_agnostic", "query_aware"])
def test_smoke_eval_writes_valid_results_and_png(llama_gqa, tiny_tokenizer, tmp_path, protocol):
    config = EvalConfig(
        policies=("snapkv", "kivi"), budgets=(0.5,), tasks=("passkey", "fidelity"),
        context_length=256, samples=1, protocol=protocol, max_new_tokens=4,
    )
    calls = []
    results = Evaluator(llama_gqa, tiny_tokenizer, config, catalog=catalog, model_name="tiny",
                        progress=lambda: calls.append(1)).run()
    assert len(calls) == 3 * 2  # (full, snapkv@0.5, kivi@0.5) x 2 tasks x 1 sample
    assert results["model"] == "tiny" and results["context_length"] == 256 and results["protocol"] == protocol
    records = results["records"]
    assert {(r["policy"], r["task"]) for r in records} == {
        (p, t) for p in ("full", "snapkv", "kivi") for t in ("passkey", "fidelity")
    }
    for r in records:
        assert RECORD_KEYS <= set(r) and 0 <= r["score"] <= 100 and r["n_samples"] == 1
        if r["policy"] != "full":
            assert r["kv_bytes"] <= 0.5 * r["full_kv_bytes"] * 1.01
    fidelity_full = next(r for r in records if r["policy"] == "full" and r["task"] == "fidelity")
    assert fidelity_full["score"] == 100 and fidelity_full["kl"] == pytest.approx(0, abs=1e-9)
    paths = write_outputs(results, tmp_path)
    assert json.loads(paths["results"].read_text()) == results
    assert paths["pareto"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| snapkv | 0.5 |" in paths["summary"].read_text()
    assert set(best_per_budget(results)) == {0.5}


def test_infeasible_budget_is_recorded_not_fatal(llama_gqa, tiny_tokenizer):
    config = EvalConfig(policies=("kivi",), budgets=(0.05,), tasks=("fidelity",), context_length=256, samples=1)
    records = Evaluator(llama_gqa, tiny_tokenizer, config, catalog=catalog, model_name="tiny").run()["records"]
    kivi = next(r for r in records if r["policy"] == "kivi")
    assert kivi["score"] is None and kivi["infeasible_samples"] == 1 and "minimum feasible" in kivi["error"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--policies", "snapkv,bogus"], "unknown policy 'bogus'; allowed: ada_kv"),
        (["eval", "--tasks", "nope"], "unknown task 'nope'; allowed: passkey"),
    ],
)
def test_eval_cli_rejects_bad_names_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_cli_rejects_bad_budget(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--budgets", "0.5,1.5"])
    assert "must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_context_longer_than_model_rejected(llama_gqa, tiny_tokenizer):
    config = EvalConfig(policies=("snapkv",), budgets=(0.5,), tasks=("passkey",), context_length=10_000)
    with pytest.raises(ValueError, match="context_length 10000 must be in \\[1, 4096\\]"):
        Evaluator(llama_gqa, tiny_tokenizer, config, catalog=catalog, model_name="tiny")


# ------------------------------------------------------------------------------ independent references


def test_fidelity_metrics_match_an_independent_reference(tiny_tokenizer):
    """KL, top-1 and perplexity equal those computed here against a DynamicCache run."""
    from transformers import DynamicCache

    from adaptive_kv import CompressedCache
    from adaptive_kv.policies import get_policy
    from conftest import build_tiny_model

    model = build_tiny_model("llama_gqa")
    config = EvalConfig(policies=("snapkv",), budgets=(0.5,), tasks=("fidelity",), context_length=256, samples=1)
    evaluator = Evaluator(model, tiny_tokenizer, config, catalog=catalog, model_name="tiny")
    (sample,) = evaluator.samples()["fidelity"]
    records = {r["policy"]: r for r in evaluator.run()["records"]}
    context, continuation = torch.tensor([sample.context_ids]), torch.tensor([sample.continuation_ids])
    policy = get_policy("snapkv")
    compressed = CompressedCache(model, plan_provider=lambda s: policy.plan(s, 0.5))
    logits = {}
    with torch.no_grad():
        for name, cache in (("full", DynamicCache(config=model.config)), ("snapkv", compressed)):
            model(context, cache=cache)
            logits[name] = model(continuation, cache=cache).logits[0, :-1].double()  # position t predicts t+1
    ref_logp = logits["full"].log_softmax(-1)
    for name in ("full", "snapkv"):
        logp = logits[name].log_softmax(-1)
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        top1 = 100 * float((logp.argmax(-1) == ref_logp.argmax(-1)).double().mean())
        nll = -logp.gather(-1, continuation[0, 1:, None]).mean()
        assert records[name]["kl"] == pytest.approx(kl, rel=METRIC_RTOL, abs=1e-9)
        assert records[name]["score"] == pytest.approx(top1)
        assert records[name]["perplexity"] == pytest.approx(float(nll.exp()), rel=METRIC_RTOL)
    assert records["snapkv"]["kl"] > 1e-4  # compression changes the predictions (measured 6e-4)


def _record_forwards(model, monkeypatch) -> list[dict]:
    """Record every forward: the ids fed and the state of the cache they were fed to."""
    calls, forward = [], model.forward

    def recording(input_ids=None, *args, cache=None, **kwargs):
        layer = cache.layers[0]
        call = dict(ids=tuple(input_ids[0].tolist()), cache=cache, capture=cache.capture,
                    compressed=layer.is_compressed, seen=layer.seen_tokens)
        out = forward(input_ids, *args, cache=cache, **kwargs)
        calls.append({**call, "logits": out.logits[0, -1]})
        return out

    monkeypatch.setattr(model, "forward", recording)
    return calls


@pytest.mark.parametrize("protocol", ["query_agnostic", "query_aware"])
def test_protocols_compress_what_they_say(tiny_tokenizer, protocol, monkeypatch):
    """query_agnostic: compress the context, then feed the question to each compressed fork;
    query_aware: compress the prompt with the question in it."""
    from transformers import DynamicCache

    from conftest import build_tiny_model

    model = build_tiny_model("llama_gqa")
    config = EvalConfig(policies=("snapkv",), budgets=(0.5,), tasks=("passkey",), context_length=256,
                        samples=1, protocol=protocol, max_new_tokens=2)
    evaluator = Evaluator(model, tiny_tokenizer, config, catalog=catalog, model_name="tiny")
    (sample,) = evaluator.samples()["passkey"]
    calls = _record_forwards(model, monkeypatch)
    evaluator.run()
    prefill, rest = calls[0], calls[1:]
    compressed_first = {id(c["cache"]): c for c in reversed(rest)}  # the first call on each fork
    assert prefill["capture"] and prefill["seen"] == 0 and not prefill["compressed"]
    assert len(compressed_first) == 2  # the full reference and snapkv@0.5, each on its own fork
    assert all(c["compressed"] and not c["capture"] for c in rest)
    if protocol == "query_agnostic":
        assert prefill["ids"] == sample.context_ids
        for first in compressed_first.values():
            assert first["ids"] == sample.question_ids and first["seen"] == len(sample.context_ids)
        full_fork = next(c for c in compressed_first.values() if c["cache"].plan.is_identity)
        monkeypatch.undo()
        with torch.no_grad():  # the question after the whole context, seen through the full fork
            ref = model(torch.tensor([sample.prompt_ids]), cache=DynamicCache(config=model.config)).logits[0, -1]
        torch.testing.assert_close(full_fork["logits"], ref, atol=FIRST_LOGITS_ATOL, rtol=0)
        snapkv_fork = next(c for c in compressed_first.values() if not c["cache"].plan.is_identity)
        assert snapkv_fork["cache"].layers[0].head_tokens().max() < len(sample.prompt_ids)
    else:
        assert prefill["ids"] == sample.prompt_ids
        for first in compressed_first.values():  # decode continues after the prompt; no question is fed
            assert len(first["ids"]) == 1 and first["seen"] == len(sample.prompt_ids)


def test_per_layer_planning_spec(llama_gqa, tiny_tokenizer):
    # snapkv decides each layer on its own: per-layer planning gives the same plan, hence the same
    # record; hybrid picks one mix from every layer's statistics, so its per-layer plan may differ
    specs = ("snapkv", "snapkv:planning=per_layer", "hybrid", "hybrid:planning=per_layer")
    config = EvalConfig(policies=specs, budgets=(0.3,), tasks=("fidelity",), context_length=256, samples=1)
    evaluator = Evaluator(llama_gqa, tiny_tokenizer, config, catalog=catalog, model_name="tiny")
    captured = evaluator._prefill(tuple(range(5, 261))).cache
    plans = {spec: evaluator._plan(spec, 0.3, captured) for spec in specs}
    assert plans["snapkv"] == plans["snapkv:planning=per_layer"]
    assert plans["hybrid:planning=per_layer"] == evaluator.policies["hybrid"].plan_per_layer(
        captured.stats, 0.3)
    records = {r["policy"]: r for r in evaluator.run()["records"]}
    assert records["snapkv"]["score"] == records["snapkv:planning=per_layer"]["score"]
    with pytest.raises(ValueError, match="planning in 'snapkv:planning=later' must be one of"):
        EvalConfig(policies=("snapkv:planning=later",), budgets=(0.5,), tasks=("fidelity",)).validate(None, ("snapkv",))


def test_a_plan_equal_to_one_already_run_is_copied_not_run_again(tiny_tokenizer, monkeypatch):
    # snapkv plans the same per layer as across layers (see above): its second spec forks nothing,
    # and both rows equal those of a run that has only the first spec
    from conftest import build_tiny_model
    from adaptive_kv.cache import CompressedCache

    model = build_tiny_model("llama_gqa")
    base = dict(budgets=(0.5,), tasks=("passkey", "fidelity"), context_length=256, samples=2, max_new_tokens=3)
    alone = Evaluator(model, tiny_tokenizer, EvalConfig(policies=("snapkv",), **base), catalog=catalog,
                      model_name="tiny").run()["records"]
    forks, fork = [], CompressedCache.fork
    monkeypatch.setattr(CompressedCache, "fork", lambda self, plan: forks.append(plan) or fork(self, plan))
    twins = Evaluator(model, tiny_tokenizer, EvalConfig(policies=("snapkv", "snapkv:planning=per_layer"), **base),
                      catalog=catalog, model_name="tiny").run()["records"]
    assert len(forks) == 2 * 2 * 2  # (full, snapkv) x 2 tasks x 2 samples
    outcome = lambda r: {k: v for k, v in r.items() if k not in ("policy", "prefill_s")}  # noqa: E731 (timed)
    by_key = {(r["policy"], r["task"]): outcome(r) for r in twins}
    for record in alone:
        if record["policy"] == "snapkv":
            assert by_key[("snapkv:planning=per_layer", record["task"])] == outcome(record)
            assert by_key[("snapkv", record["task"])] == outcome(record)


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    import itertools

    from adaptive_kv.evaluation import bootstrap_interval

    scores = [0.0, 100.0, 100.0, 50.0]
    # every resample of 4 from 4 is equally likely: the exact distribution of the resampled mean
    means = [sum(pick) / 4 for pick in itertools.product(scores, repeat=4)]
    below = lambda x: sum(m < x for m in means) / len(means)  # noqa: E731
    at_most = lambda x: sum(m <= x for m in means) / len(means)  # noqa: E731
    low, high = bootstrap_interval(scores)
    # each end is its quantile of the exact distribution, within the 2000 resamples' Monte Carlo error
    assert below(low) <= 0.025 + 0.01 and at_most(low) >= 0.025 - 0.01
    assert below(high) <= 0.975 + 0.01 and at_most(high) >= 0.975 - 0.01
    assert low < sum(scores) / 4 < high
    assert bootstrap_interval([100.0] * 5) == [100.0, 100.0]


def test_a_failed_write_leaves_the_previous_outputs_whole(llama_gqa, tiny_tokenizer, tmp_path, monkeypatch):
    import os

    config = EvalConfig(policies=("snapkv",), budgets=(0.5,), tasks=("passkey",), context_length=256, samples=1,
                        max_new_tokens=2)
    results = Evaluator(llama_gqa, tiny_tokenizer, config, catalog=catalog, model_name="tiny").run()
    paths = write_outputs(results, tmp_path)
    before = {name: path.read_bytes() for name, path in paths.items()}

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_outputs({**results, "model": "other"}, tmp_path)
    assert {name: path.read_bytes() for name, path in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png", "results.json", "summary.md"]


def test_rows_made_by_another_rule_say_so(llama_gqa, tiny_tokenizer, tmp_path):
    """`learned` outside its trained range plans as kvzip: its records carry the plan's note, and the
    summary lists it; inside the range nothing is noted."""
    import dataclasses

    from adaptive_kv.plan import Layout
    from adaptive_kv.policies.controller.files import ControllerConfig, save_controller
    from adaptive_kv.policies.controller.options import option_grid
    from adaptive_kv.report import plan_notes, summary_markdown
    from adaptive_kv.stats import FEATURE_NAMES

    torch.manual_seed(0)
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES, grid=option_grid(),
        layout=Layout(sink_tokens=4, recent_window=16, group_size=16, scorer="snapkv", selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1,
    )
    network = config.build()
    folders = {}
    for name, (low, high) in {"inside": (240, 256), "outside": (2000, 2100)}.items():
        ranged = dataclasses.replace(config, notes={"trained_range": dict(
            min_length=low, max_length=high, min_budget=0.25, max_budget=0.5)})
        folders[name] = save_controller(tmp_path / name, ranged, network)
    specs = {name: f"learned:path={folder}" for name, folder in folders.items()}
    eval_config = EvalConfig(policies=tuple(specs.values()), budgets=(0.5,), tasks=("fidelity",), context_length=256,
                             samples=2)
    results = Evaluator(llama_gqa, tiny_tokenizer, eval_config, catalog=catalog, model_name="tiny").run()
    rows = {r["policy"]: r for r in results["records"]}
    outside, inside = rows[specs["outside"]], rows[specs["inside"]]
    assert outside["noted_samples"] == 2 and "outside the controller's range" in outside["note"]
    assert "kvzip" in outside["note"]
    assert "noted_samples" not in inside and "note" not in inside
    (line,) = plan_notes(results)
    assert line.startswith(f"{specs['outside']} @ 0.5: 2 of 2 samples: ")
    assert line in summary_markdown(results)


def _progress_config(**overrides) -> EvalConfig:
    settings = dict(policies=("snapkv", "kivi"), budgets=(0.5,), tasks=("passkey", "fidelity"), context_length=256,
                    samples=3, max_new_tokens=4)
    return EvalConfig(**{**settings, **overrides})


def test_a_stopped_run_resumes_and_grows_to_the_results_of_one_run(llama_gqa, tiny_tokenizer, tmp_path, monkeypatch):
    def evaluator(samples: int) -> Evaluator:
        return Evaluator(llama_gqa, tiny_tokenizer, _progress_config(samples=samples), catalog=catalog,
                         model_name="tiny")

    scores = lambda res: {(r["policy"], r["budget"], r["task"]): r["sample_scores"] for r in res["records"]}  # noqa: E731
    whole = evaluator(3).run()
    progress = tmp_path / "progress.json"
    # stopped for real in the middle of the second task's first sample (a session ending, a kill)
    stopped = evaluator(2)
    real, calls = stopped._run_sample, []

    def dies_on_the_third(sample, tallies):
        calls.append(sample.task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(sample, tallies)

    monkeypatch.setattr(stopped, "_run_sample", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        stopped.run(progress)
    monkeypatch.undo()
    resumed = evaluator(2)
    prefills = []
    monkeypatch.setattr(resumed, "_prefill", lambda ids: prefills.append(ids) or Evaluator._prefill(resumed, ids))
    half = resumed.run(progress, resume=True)
    assert len(prefills) == 2  # fidelity's two samples; passkey's came from the file
    # grown to three samples: only the third of each task runs
    grown = evaluator(3).run(progress, resume=True)
    assert scores(grown) == scores(whole)
    assert {k: v[:2] for k, v in scores(whole).items()} == scores(half)
    assert all(r["n_samples"] == 3 for r in grown["records"])


@pytest.mark.parametrize("overrides, message", [
    (dict(budgets=(0.25,)), "budgets was [0.5], now [0.25]"),
    (dict(seed=1), "seed was 0, now 1"),
    (dict(samples=1), "samples must be >= 2"),
])
def test_resuming_with_other_settings_is_refused(llama_gqa, tiny_tokenizer, tmp_path, overrides, message):
    progress = tmp_path / "progress.json"
    Evaluator(llama_gqa, tiny_tokenizer, _progress_config(samples=2, tasks=("fidelity",)), catalog=catalog,
              model_name="tiny").run(progress)
    other = Evaluator(llama_gqa, tiny_tokenizer, _progress_config(tasks=("fidelity",), **{"samples": 2, **overrides}),
                      catalog=catalog, model_name="tiny")
    with pytest.raises(ValueError, match=re.escape(message)):
        other.run(progress, resume=True)


def test_a_file_that_is_not_a_progress_file_is_refused_by_name(tmp_path):
    from adaptive_kv.eval_progress import read_progress

    path = tmp_path / "progress.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot resume from {re.escape(str(path))}: not a progress file"):
        read_progress(path, {"seed": 0}, samples=1)


def test_eval_cli_refuses_a_resume_with_other_settings_before_loading_the_model(tmp_path, capsys):
    from adaptive_kv.eval_progress import write_progress
    from adaptive_kv.evaluation import build_policies, run_identity

    missing = str(tmp_path / "no-model-here")  # loading it would fail with another message
    made = EvalConfig(policies=("snapkv",), budgets=(0.5,), tasks=("passkey",), samples=2)
    identity = run_identity(missing, made, build_policies(made, catalog)[0])
    write_progress(tmp_path / "progress.json", identity, [("passkey", 0)], [], 1.0)
    argv = ["eval", "--model", missing, "--policies", "snapkv", "--tasks", "passkey", "--samples", "2",
            "--output", str(tmp_path), "--resume"]
    assert main([*argv, "--budgets", "0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert "budgets was [0.5], now [0.25]" in err and len(err.splitlines()) == 1


def _save_tiny_controller(folder, seed: int):
    """A random controller for llama_gqa's shape (2 layers x 2 KV heads, head_dim 16) in `folder`."""
    from adaptive_kv.plan import Layout
    from adaptive_kv.policies.controller.files import ControllerConfig, save_controller
    from adaptive_kv.policies.controller.options import option_grid
    from adaptive_kv.stats import FEATURE_NAMES

    torch.manual_seed(seed)
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES, grid=option_grid(),
        layout=Layout(sink_tokens=4, recent_window=32, group_size=32, scorer="snapkv", selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1)
    save_controller(folder, config, config.build())


def test_a_controller_retrained_in_the_same_folder_cannot_resume_the_other_ones_run(llama_gqa, tiny_tokenizer,
                                                                                    tmp_path):
    folder, progress = tmp_path / "controller", tmp_path / "run" / "progress.json"
    config = _progress_config(policies=(f"learned:path={folder}",), tasks=("fidelity",), samples=1)

    def evaluator(samples: int) -> Evaluator:
        return Evaluator(llama_gqa, tiny_tokenizer, dataclasses.replace(config, samples=samples), catalog=catalog,
                         model_name="tiny")

    _save_tiny_controller(folder, seed=0)
    evaluator(1).run(progress)
    _save_tiny_controller(folder, seed=0)  # written again, the same weights: the run continues
    evaluator(2).run(progress, resume=True)
    _save_tiny_controller(folder, seed=1)  # retrained: its samples would mix with the other's in one row
    with pytest.raises(ValueError, match=re.escape("cannot resume from") + ".*policy_weights was"):
        evaluator(3).run(progress, resume=True)


def test_a_scorer_refitted_in_the_same_folder_cannot_resume_kvzaps_run(llama_gqa, tiny_tokenizer, tmp_path):
    from conftest import random_predictor

    folder, progress = tmp_path / "scorer", tmp_path / "run" / "progress.json"
    config = _progress_config(policies=(f"kvzap:path={folder}",), tasks=("fidelity",), samples=1)

    def evaluator(samples: int) -> Evaluator:
        return Evaluator(llama_gqa, tiny_tokenizer, dataclasses.replace(config, samples=samples), catalog=catalog,
                         model_name="tiny")

    random_predictor(llama_gqa, seed=0).save(folder)
    evaluator(1).run(progress)
    random_predictor(llama_gqa, seed=0).save(folder)  # written again, the same weights: the run continues
    evaluator(2).run(progress, resume=True)
    random_predictor(llama_gqa, seed=1).save(folder)  # refitted: its samples would mix with the other's in one row
    with pytest.raises(ValueError, match=re.escape("cannot resume from") + ".*policy_weights was"):
        evaluator(3).run(progress, resume=True)
