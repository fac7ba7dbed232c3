"""benchmarks/eval_table.py: paired differences against a reference policy, on the same samples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "eval_table", Path(__file__).resolve().parents[2] / "benchmarks" / "eval_table.py")
eval_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_table)


def _write(root: Path, task: str, by_policy: dict[tuple[str, float], list[float]]) -> None:
    records = [{"policy": p, "budget": b, "task": task, "score": sum(s) / len(s), "sample_scores": s}
               for (p, b), s in by_policy.items()]
    (root / task).mkdir(parents=True)
    (root / task / "results.json").write_text(json.dumps({"protocol": "query_agnostic", "records": records}))


def test_a_constant_difference_has_no_spread_and_a_loss_beyond_the_noise_is_listed(tmp_path):
    # learned is 100 below kvzip on every passkey sample at 0.125, and ties it on niah_single
    _write(tmp_path, "passkey", {("full", 1.0): [100.0] * 6, ("kvzip", 0.125): [100.0] * 6,
                                 ("learned", 0.125): [0.0] * 6})
    _write(tmp_path, "niah_single", {("kvzip", 0.125): [0, 100, 0, 100, 0, 100], ("learned", 0.125): [100, 0, 100, 0, 100, 0]})
    eval_table.main([str(tmp_path), "--paired-against", "kvzip"])
    text = (tmp_path / "README.md").read_text()
    assert "| passkey (agnostic) | -100.0 [-100.0, -100.0] |" in text
    assert "- learned: passkey (agnostic) @ 0.125 -100.0 [-100.0, -100.0]\n" in text
    # niah_single: the mean difference is 0 and its interval spans both signs, so it is not listed
    mean, low, high = eval_table.paired([100, 0, 100, 0, 100, 0], [0, 100, 0, 100, 0, 100])
    assert mean == 0 and low < 0 < high and "niah_single" not in text.split("Below kvzip")[1]


def test_the_interval_is_that_of_the_mean_difference_not_of_either_score():
    # differences 10, 10, 10, 30: mean 15; a resample's mean lies in [10, 30]
    mean, low, high = eval_table.paired([60.0, 70.0, 80.0, 90.0], [50.0, 60.0, 70.0, 60.0])
    assert mean == 15.0 and 10.0 <= low <= 15.0 <= high <= 30.0
    with pytest.raises(ValueError, match="paired rows need the same samples, got 2 and 3 scores"):
        eval_table.paired([1.0, 2.0], [1.0, 2.0, 3.0])


def test_an_unknown_reference_is_refused_naming_the_option(tmp_path, capsys):
    _write(tmp_path, "passkey", {("kvzip", 0.125): [100.0], ("learned", 0.125): [0.0]})
    with pytest.raises(SystemExit):
        eval_table.main([str(tmp_path), "--paired-against", "kvzap"])
    assert "--paired-against 'kvzap' is not a policy of these rows (kvzip, learned)" in capsys.readouterr().err


def test_made_by_sets_one_command_as_code_and_keeps_prose_as_written(tmp_path):
    _write(tmp_path, "passkey", {("kvzip", 0.125): [100.0], ("learned", 0.125): [0.0]})
    eval_table.main([str(tmp_path), "--made-by", "bash benchmarks/range_figures.sh 20 8192"])
    assert (tmp_path / "README.md").read_text().startswith("Made by `bash benchmarks/range_figures.sh 20 8192`; table by")
    prose = "`bash a.sh` for the rows, `bash b.sh` for the reruns"
    eval_table.main([str(tmp_path), "--made-by", prose])
    assert (tmp_path / "README.md").read_text().startswith(f"Made by {prose}; table by")
