"""Evaluation harness on a tiny model: schema, reports, shared prefills, CLI errors."""

import json

import pytest

from adaptive_kv.cli import main
from adaptive_kv.evaluation import EvalConfig, Evaluator
from adaptive_kv.report import best_per_budget, write_outputs

RECORD_KEYS = {"policy", "budget", "task", "score", "n_samples", "kv_bytes", "full_kv_bytes"}


@pytest.mark.parametrize("protocol", ["query_agnostic", "query_aware"])
def test_smoke_eval_writes_valid_results_and_png(llama_gqa, tiny_tokenizer, tmp_path, protocol):
    config = EvalConfig(
        policies=("snapkv", "kivi"), budgets=(0.5,), tasks=("passkey", "fidelity"),
        context_length=256, samples=1, protocol=protocol, max_new_tokens=4,
    )
    calls = []
    results = Evaluator(llama_gqa, tiny_tokenizer, config, model_name="tiny", progress=lambda: calls.append(1)).run()
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
    records = Evaluator(llama_gqa, tiny_tokenizer, config, model_name="tiny").run()["records"]
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
        Evaluator(llama_gqa, tiny_tokenizer, config, model_name="tiny")
