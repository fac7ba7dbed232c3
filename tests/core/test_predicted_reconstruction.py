"""Reconstruction scores predicted inside the prefill: the scorer, its files, its fit (tier 1, tiny models)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from adaptive_kv import CompressedCache
from adaptive_kv.predicted_reconstruction import (POSITION_FEATURES, PREDICTED_SCORER, PredictorShape, load_predictor,
                                                  position_features)
from adaptive_kv.policies import get_policy
from adaptive_kv.prefill import capture, needs_of
from adaptive_kv.stats import PREDICTED_FEATURES, StatsConfig
from adaptive_kv.training.scorer import (FitOptions, ScorerExample, collect_example, fit_predictor, heldout_metrics,
                                         spearman, top_recall)
from conftest import build_family_model, build_tiny_model, random_predictor

CONTEXT = 160


def _ids(seed: int, length: int = CONTEXT) -> list[int]:
    return torch.randint(2, 4000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hand_positions(seq_len: int) -> torch.Tensor:
    """Every POSITION_FEATURES column of a seq_len-token context, written out token by token."""
    rows = []
    for t in range(seq_len):
        rest = seq_len - 1 - t
        rows.append([t / seq_len, math.log(1 + t), math.log(1 + rest), (t / seq_len) ** 2, math.exp(-rest / 64),
                     math.exp(-t / 64), math.log(seq_len)])
    return torch.tensor(rows)


@torch.no_grad()
def _direct_scores(model, predictor, ids: list[int]) -> torch.Tensor:
    """The predictor applied to each layer's normalised residual stream (and the tokens' positions, by hand),
    computed without any hook."""
    out = model(torch.tensor([ids]), output_hidden_states=True)
    columns = [POSITION_FEATURES.index(name) for name in predictor.position_features]
    where = _hand_positions(len(ids))[:, columns]
    rows = []
    for layer_idx, layer in enumerate(model.model.layers):
        hidden = torch.cat([layer.input_layernorm(out.hidden_states[layer_idx])[0], where], dim=-1)
        w = predictor.weights
        x = (hidden - w["mean"][layer_idx]) / w["std"][layer_idx]
        if predictor.kind == "linear":
            logs = x @ w["w"][layer_idx] + w["b"][layer_idx]
        else:
            logs = torch.nn.functional.silu(x @ w["w1"][layer_idx] + w["b1"][layer_idx]) @ w["w2"][layer_idx] + w["b2"][layer_idx]
        rows.append(logs.T.clamp(max=0.0).exp().clamp_min(1e-6))
    return torch.stack(rows)


@pytest.mark.parametrize("positions", [(), POSITION_FEATURES, ("near_end", "relative")])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("family", ["llama_gqa", "qwen3"])
def test_prefill_scores_equal_the_predictor_on_each_layers_input(family, kind, positions):
    model = build_family_model(family)
    predictor = random_predictor(model, kind, position_features=positions)
    ids = _ids(0)
    captured = capture(model, None, ids, StatsConfig(predictor=predictor))
    stats = captured.cache.stats
    torch.testing.assert_close(stats.token_scores[PREDICTED_SCORER], _direct_scores(model, predictor, ids),
                               atol=1e-6, rtol=1e-5)
    assert set(PREDICTED_FEATURES) <= set(stats.feature_names)
    assert "reconstruction" not in stats.token_scores and captured.cache.reconstruction_seconds == 0


def test_kvzap_bounded_prefill_gives_the_end_of_prefill_plan(tmp_path):
    model = build_tiny_model("llama_gqa")
    random_predictor(model).save(tmp_path)
    policy, budget, layers = get_policy("kvzap", path=str(tmp_path)), 0.15, model.config.num_hidden_layers
    ids = torch.tensor([_ids(1, 600)])
    bounded = CompressedCache(model, layer_plan_provider=lambda stats, i: policy.plan_layer(stats, i, layers, budget),
                              stats_config=policy.stats_config())
    with torch.no_grad():
        model(ids, cache=bounded)
    end = CompressedCache(model, plan_provider=lambda stats: policy.plan_per_layer(stats, budget),
                          stats_config=policy.stats_config())
    with torch.no_grad():
        model(ids, cache=end)
    assert bounded.plan == end.plan and bounded.plan.scorer == PREDICTED_SCORER
    assert bounded.nbytes() == end.nbytes() <= budget * end.full_nbytes()
    # the plan follows the predicted scores: other weights, another plan
    other = CompressedCache(model, plan_provider=lambda stats: policy.plan_per_layer(stats, budget),
                            stats_config=StatsConfig(predictor=random_predictor(model, seed=5)))
    with torch.no_grad():
        model(ids, cache=other)
    assert [[b.keep for b in row] for row in other.plan.heads] != [[b.keep for b in row] for row in end.plan.heads]


def test_one_prefill_reads_one_predictor(tmp_path):
    model = build_tiny_model("llama_gqa")
    random_predictor(model).save(tmp_path / "a")
    random_predictor(model, seed=1).save(tmp_path / "b")
    same = [get_policy("kvzap", path=str(tmp_path / "a")), get_policy("kvzap", path=str(tmp_path / "a"))]
    assert needs_of(same + [get_policy("kvzip")]).predictor is same[0].predictor  # one file, one object
    with pytest.raises(ValueError, match="one prefill runs one reconstruction predictor"):
        needs_of([same[0], get_policy("kvzap", path=str(tmp_path / "b"))])
    # a copy of one scorer in another folder (each trained controller ships its own) shares the prefill
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    copy = get_policy("kvzap", path=str(tmp_path / "copy"))
    assert copy.predictor is not same[0].predictor and needs_of([same[0], copy]).predictor is same[0].predictor


def test_mismatched_or_broken_scorer_files_are_refused(tmp_path, monkeypatch):
    import adaptive_kv.predicted_reconstruction as pr

    model = build_tiny_model("llama_gqa")
    other = build_tiny_model("llama_mha")
    random_predictor(other).save(tmp_path / "mha")
    with pytest.raises(ValueError, match=r"scorer was fitted for PredictorShape\(num_layers=2, num_kv_heads=4"):
        CompressedCache(model, capture=True, stats_config=get_policy("kvzap", path=str(tmp_path / "mha")).stats_config())
    with pytest.raises(ValueError, match="lacks scorer.json"):
        load_predictor(tmp_path / "nothing")
    folder = random_predictor(model).save(tmp_path / "big")
    monkeypatch.setattr(pr, "MAX_WEIGHTS_BYTES", 100)
    with pytest.raises(ValueError, match="over the 100-byte limit for a scorer file"):
        load_predictor(folder)
    monkeypatch.undo()
    meta = json.loads((folder / "scorer.json").read_text())
    meta["shape"]["hidden_size"] = 32
    (folder / "scorer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"scorer weight 'mean' has shape \(2, 64\), expected \(2, 32\)"):
        load_predictor(folder)
    (folder / "scorer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a scorer description"):
        load_predictor(folder)
    (folder / "scorer.json").write_text(json.dumps({**meta, "kind": "forest"}))
    with pytest.raises(ValueError, match=r"scorer kind must be one of \('linear', 'mlp'\), got 'forest'"):
        load_predictor(folder)


def test_ranking_metrics_against_hand_counts():
    exact = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]])
    assert spearman(exact, exact).item() == pytest.approx(1.0)
    assert spearman(-exact, exact).item() == pytest.approx(-1.0)
    shifted = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0]])  # top 2 of exact: 9, 8 -> got 0, 8
    assert top_recall(shifted, exact, 0.2).item() == pytest.approx(0.5)
    # d = ranks differ by 9 at two positions: 1 - 6 * 162 / (10 * 99)
    assert spearman(shifted, exact).item() == pytest.approx(1 - 6 * 162 / 990, abs=1e-6)


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    model = build_tiny_model("llama_gqa")
    return model, [collect_example(model, tiny_tokenizer, _ids(10 + i), f"r{i}") for i in range(14)]


def test_a_fitted_scorer_ranks_tokens_as_the_exact_pass_does(examples):
    model, data = examples
    train, held_out = data[:10], data[10:]
    shape = PredictorShape.of(model.config)
    fitted = heldout_metrics(fit_predictor(train, "mlp", shape, FitOptions(steps=300)), held_out)
    assert min(fitted["recall_top25"]) > 0.4 and min(fitted["spearman"]) > 0.3  # chance: 0.25 and 0
    # the same fit on hidden states shuffled across tokens learns nothing about which token matters
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(e.tokens, generator=gen) for e in train]
    shuffled = [ScorerExample(e.key, e.inputs[:, p], e.targets, e.positions[p], e.seq_len) for e, p in zip(train, perms)]
    blind = heldout_metrics(fit_predictor(shuffled, "mlp", shape, FitOptions(steps=300)), held_out)
    assert max(blind["recall_top25"]) < 0.33 and max(blind["spearman"]) < 0.15


def test_examples_hold_the_exact_scores_of_the_prefill(examples, tiny_tokenizer):
    model, data = examples
    captured = capture(model, tiny_tokenizer, _ids(10), StatsConfig(reconstruction=True))
    exact = captured.cache.stats.token_scores["reconstruction"][:, :, 4:]
    torch.testing.assert_close(data[0].targets, exact.clamp_min(1e-6).log())
    assert data[0].inputs.shape == (2, CONTEXT - 4, model.config.hidden_size)
    assert data[0].positions.tolist() == list(range(4, CONTEXT)) and data[0].seq_len == CONTEXT
    drawn = collect_example(model, tiny_tokenizer, _ids(10), "r0", sample_tokens=20, seed=3)
    exact_logs = exact.clamp_min(1e-6).log()  # the drawn tokens' targets are theirs, found by position
    torch.testing.assert_close(drawn.targets, exact_logs[:, :, drawn.positions - 4])
    assert drawn.positions.tolist() == sorted(set(drawn.positions.tolist())) and len(drawn.positions) == 20


def test_learned_reads_predicted_scores_as_it_reads_exact_ones(tmp_path):
    from adaptive_kv.plan import Layout
    from adaptive_kv.policies.controller.files import ControllerConfig, save_controller
    from adaptive_kv.policies.controller.options import option_grid
    from adaptive_kv.stats import FEATURE_NAMES, RECONSTRUCTION_FEATURES

    model = build_tiny_model("llama_gqa")
    torch.manual_seed(0)
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES + RECONSTRUCTION_FEATURES,
        grid=option_grid(global_keeps=(0.2, 0.1)), layout=Layout(scorer="reconstruction", selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1)
    folder = save_controller(tmp_path, config, config.build())
    predictor = random_predictor(model)
    predictor.save(folder)
    exact, predicted = get_policy("learned", path=str(folder)), get_policy("learned", path=str(folder),
                                                                            reconstruction="predicted")
    needs = predicted.stats_config()
    assert needs.predictor is not None and not needs.reconstruction and exact.stats_config().reconstruction
    ids = _ids(2, 600)
    stats = capture(model, None, ids, needs).cache.stats
    # the same prefill's statistics with the predicted scores standing in for exact ones, by their exact names
    plain = capture(model, None, ids, StatsConfig()).cache.stats
    as_exact = plain.with_reconstruction(stats.token_scores[PREDICTED_SCORER], "reconstruction")
    for budget in (0.3, 0.15):
        want, got = exact.plan(as_exact, budget), predicted.plan(stats, budget)
        assert got.heads == want.heads and got.scorer == PREDICTED_SCORER and want.scorer == "reconstruction"
    with pytest.raises(ValueError, match="holds no reconstruction predictor"):
        get_policy("learned", path=str(folder), reconstruction="predicted", scorer_path=str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"reconstruction must be one of \('auto', 'exact', 'predicted'\), got 'guess'"):
        get_policy("learned", path=str(folder), reconstruction="guess")


@pytest.mark.parametrize("argv, message", [
    (["train-scorer", "--context-lengths", "1024,32"], "context_lengths must be in [64, 16384], got (1024, 32)"),
    (["train-scorer", "--kinds", "linear,forest"], "kinds must be among ('linear', 'mlp'), got ('linear', 'forest')"),
    (["train-scorer", "--context-lengths", "1024,2048", "--train-per-task", "6,6,2"],
     "train_per_task must be an integer >= 1 or one per context length (2), got (6, 6, 2)"),
    (["train", "--scorer", "/nonexistent/scorer"], "scorer folder /nonexistent/scorer lacks scorer.json"),
    (["train", "--scorer", "/nonexistent/scorer", "--fit-scorer"], "give scorer (a fitted scorer's folder) or fit_scorer"),
])
def test_scorer_flags_are_refused_in_one_line(argv, message, capsys):
    from adaptive_kv.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, features", [([], POSITION_FEATURES), (["--hidden-only"], ())])
def test_train_scorer_reads_positions_unless_told_hidden_only(flags, features, monkeypatch, capsys):
    import adaptive_kv.training.scorer_train as scorer_train
    from adaptive_kv.cli import main

    seen = []

    def run(config, log=print):
        seen.append(config)
        return {"by_kind": {}, "kind": "linear", "scorer": "s", "ui": "u"}

    monkeypatch.setattr(scorer_train, "run_train_scorer", run)
    assert main(["train-scorer", *flags]) == 0
    assert seen[0].fit.position_features == features


@pytest.mark.parametrize("flag, counts", [("6", 6), ("6,2", (6, 2))])
def test_train_scorer_takes_one_count_or_one_per_length(flag, counts, monkeypatch):
    import adaptive_kv.training.scorer_train as scorer_train
    from adaptive_kv.cli import main

    seen = []
    monkeypatch.setattr(scorer_train, "run_train_scorer",
                        lambda config, log=print: seen.append(config) or {"by_kind": {}, "kind": "mlp", "scorer": "s", "ui": "u"})
    assert main(["train-scorer", "--context-lengths", "1024,8192", "--train-per-task", flag]) == 0
    assert seen[0].train_per_task == counts


def test_counts_per_length_draw_each_length_as_a_single_count_would(tiny_tokenizer):
    """Fewer long contexts than short ones: each length's requests are those a run with that length's
    count alone draws, in the order of the lengths (a request's place seeds its token draw)."""
    from adaptive_kv.training.calibration import make_split
    from adaptive_kv.training.scorer_train import ScorerTrainConfig

    config = ScorerTrainConfig(tasks=("passkey", "fidelity"), context_lengths=(128, 256), train_per_task=(3, 1))
    train, valid = config.requests(tiny_tokenizer)
    short_train, short_valid = make_split(tiny_tokenizer, tasks=("passkey", "fidelity"), context_lengths=(128,),
                                          train_per_task=3, valid_per_task=1, protocols=("query_agnostic",))
    long_train, long_valid = make_split(tiny_tokenizer, tasks=("passkey", "fidelity"), context_lengths=(256,),
                                        train_per_task=1, valid_per_task=1, protocols=("query_agnostic",))
    assert [r.key for r in train] == [r.key for r in short_train + long_train] and len(train) == 6 + 2
    assert [list(r.context_ids) for r in train] == [list(r.context_ids) for r in short_train + long_train]
    assert [r.key for r in valid] == [r.key for r in short_valid + long_valid]
    assert config.train_counts() == (3, 1) and ScorerTrainConfig(context_lengths=(128, 256)).train_counts() == (2, 2)


def test_heldout_metrics_are_per_layer_over_requests_and_heads():
    model = build_tiny_model("llama_mha")  # 2 layers x 4 KV heads: a per-head average would have 4 entries
    predictor = random_predictor(model)
    gen = torch.Generator().manual_seed(3)
    examples = []
    for i in range(3):
        inputs = torch.randn(2, 50, model.config.hidden_size, generator=gen).half()
        positions = torch.arange(50)
        own = torch.stack([predictor.log_scores(l, inputs[l].float(), positions, 50) for l in range(2)])  # (L, H, N)
        targets = torch.stack([own[0], -own[1]])  # layer 0 ranked as predicted, layer 1 reversed
        examples.append(ScorerExample(f"r{i}", inputs, targets, positions, 50))
    metrics = heldout_metrics(predictor, examples)
    assert metrics["spearman"] == pytest.approx([1.0, -1.0], abs=1e-6)
    assert metrics["recall_top25"] == pytest.approx([1.0, 0.0])


def test_a_sliding_layer_is_scored_over_the_tokens_it_holds():
    from adaptive_kv.cache import sliding_windows
    from adaptive_kv.plan import window_tokens

    model = build_family_model("gemma3")  # sliding, global, sliding layers
    predictor = random_predictor(model, position_features=POSITION_FEATURES)  # a window's tokens sit at the end
    ids = _ids(0)
    stats = capture(model, None, ids, StatsConfig(predictor=predictor)).cache.stats
    direct = _direct_scores(model, predictor, ids)
    for layer, window in enumerate(sliding_windows(model.config)):
        held = window_tokens(CONTEXT, window)
        got = stats.token_scores[PREDICTED_SCORER][layer]
        torch.testing.assert_close(got[:, CONTEXT - held:], direct[layer][:, CONTEXT - held:], atol=1e-6, rtol=1e-5)
        assert (got[:, : CONTEXT - held] == 0).all()
    assert window_tokens(CONTEXT, sliding_windows(model.config)[0]) < CONTEXT  # the case is really sliding


def test_plans_from_scores_predicted_far_from_the_fitted_lengths_say_so(tmp_path):
    """A scorer records the context lengths it was fitted on; kvzap and learned plan as usual outside them
    (a tenth of reach each way) and their plans' notes say the scores are extrapolated."""
    import dataclasses

    from adaptive_kv.policies.controller.files import ControllerConfig, save_controller
    from adaptive_kv.policies.controller.options import option_grid
    from adaptive_kv.predicted_reconstruction import FittedLengths
    from adaptive_kv.plan import Layout
    from adaptive_kv.stats import FEATURE_NAMES, RECONSTRUCTION_FEATURES

    model = build_tiny_model("llama_gqa")
    folder = dataclasses.replace(random_predictor(model), fitted_lengths=FittedLengths(200, 400)).save(tmp_path / "s")
    assert json.loads((folder / "scorer.json").read_text())["fitted_lengths"] == {"min_length": 200, "max_length": 400}
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES + RECONSTRUCTION_FEATURES,
        grid=option_grid(global_keeps=(0.2, 0.1)), layout=Layout(scorer="reconstruction", selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1)
    controller = save_controller(tmp_path / "c", config, config.build())
    policies = [get_policy("kvzap", path=str(folder)),
                get_policy("learned", path=str(controller), reconstruction="predicted", scorer_path=str(folder))]
    unrecorded = get_policy("kvzap", path=str(random_predictor(model).save(tmp_path / "old")))
    for length, extrapolated in ((181, True), (182, False), (440, False), (441, True), (600, True)):
        stats = capture(model, None, _ids(3, length), policies[0].stats_config()).cache.stats
        for policy in policies:
            plan = policy.plan(stats, 0.3)
            said = plan.note is not None and f"{length} tokens is outside the 200-400 tokens the reconstruction scorer" in plan.note
            assert said == extrapolated, (type(policy).__name__, length, plan.note)
            # the note never changes the plan: the same heads as the scores planned without a recorded range
            if policy is policies[0]:
                assert plan.heads == unrecorded.plan(stats, 0.3).heads and unrecorded.plan(stats, 0.3).note is None
    meta = json.loads((folder / "scorer.json").read_text())
    (folder / "scorer.json").write_text(json.dumps({**meta, "fitted_lengths": {"min_length": 500, "max_length": 20}}))
    with pytest.raises(ValueError, match=r"fitted_lengths must satisfy 1 <= min_length <= max_length, got 500, 20"):
        load_predictor(folder)


def test_plan_and_generate_print_what_the_plan_says_about_itself(tmp_path, tiny_tokenizer_bos, capsys):
    """A user's `plan` and `generate` show the plan's note: here a controller and its scorer asked far
    outside the lengths they were trained and fitted on."""
    import dataclasses

    from adaptive_kv.cli import main
    from adaptive_kv.policies.controller.files import ControllerConfig, save_controller
    from adaptive_kv.policies.controller.options import option_grid
    from adaptive_kv.predicted_reconstruction import FittedLengths
    from adaptive_kv.plan import Layout
    from adaptive_kv.stats import FEATURE_NAMES, RECONSTRUCTION_FEATURES

    model = build_tiny_model("llama_gqa")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer_bos.__class__(tokenizer_object=tiny_tokenizer_bos.backend_tokenizer, bos_token="<s>",
                                 eos_token="</s>").save_pretrained(model_dir)
    config = ControllerConfig(
        model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES + RECONSTRUCTION_FEATURES,
        grid=option_grid(global_keeps=(0.2, 0.1)), layout=Layout(scorer="reconstruction", selection="per_head"),
        layer_weights=(1.0, 1.0), hidden=16, layers=1,
        notes={"reconstruction": "predicted", "trained_range": {"min_length": 4000, "max_length": 4000,
                                                                "min_budget": 0.1, "max_budget": 0.5}})
    folder = save_controller(tmp_path / "controller", config, config.build())
    dataclasses.replace(random_predictor(model), fitted_lengths=FittedLengths(4000, 4000)).save(folder)
    prompt = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 12
    common = ["--model", str(model_dir), "--policy", "learned", "--controller", str(folder), "--budget", "0.5", "--raw"]
    outside = "is outside the controller's range: trained on 4000-4000 tokens"
    extrapolated = "tokens is outside the 4000-4000 tokens the reconstruction scorer was fitted on"
    assert main(["plan", prompt, *common]) == 0
    out = capsys.readouterr().out
    assert "note: " in out and outside in out and extrapolated in out
    assert main(["generate", prompt, *common, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "[kv] note: " in out and outside in out and extrapolated in out
    assert main(["generate", prompt, *common, "--max-new-tokens", "2", "--json"]) == 0
    note = json.loads(capsys.readouterr().out)["kv"]["note"]
    assert outside in note and extrapolated in note


def test_kvzap_window_floor_keeps_what_the_window_reads_where_the_predictor_says_nothing(tmp_path):
    """floor="window": each predicted score is raised to the window's attention. A scorer predicting the
    floor everywhere leaves the window's scores alone, so the plan is kvzip's over window scores."""
    import dataclasses

    model = build_tiny_model("llama_gqa")
    flat = random_predictor(model)
    flat = dataclasses.replace(flat, weights={**flat.weights, "w": torch.zeros_like(flat.weights["w"]),
                                              "b": torch.full_like(flat.weights["b"], -50.0)})
    folder = flat.save(tmp_path / "flat")
    floored, plain = get_policy("kvzap", path=str(folder), floor="window"), get_policy("kvzap", path=str(folder))
    stats = capture(model, None, _ids(5), floored.stats_config()).cache.stats
    assert torch.all(stats.token_scores[PREDICTED_SCORER] == stats.token_scores[PREDICTED_SCORER].flatten()[0])
    by_window = get_policy("kvzip", scorer="window")
    for budget in (0.3, 0.5):
        assert floored.plan(stats, budget).heads == by_window.plan(stats, budget).heads
        assert plain.plan(stats, budget).heads != by_window.plan(stats, budget).heads
    with pytest.raises(ValueError, match=r"kvzap floor must be one of \('none', 'window'\), got 'windows'"):
        get_policy("kvzap", path=str(folder), floor="windows")


def test_position_features_are_the_documented_functions_of_place_and_length():
    torch.testing.assert_close(position_features(torch.arange(300), 300), _hand_positions(300))
    # a subset, in its own order; tokens given out of order are featured where they sit
    picked = position_features(torch.tensor([299, 0]), 300, ("near_end", "relative"))
    torch.testing.assert_close(picked, torch.tensor([[1.0, 299 / 300], [math.exp(-299 / 64), 0.0]]))
    with pytest.raises(ValueError, match="position_features must be distinct names among .*'middle'"):
        position_features(torch.arange(3), 3, ("middle",))
    # the fit's options and the predictor check names by the same rule, each naming its field
    for build in (lambda names: FitOptions(position_features=names),
                  lambda names: random_predictor(build_tiny_model("llama_gqa"), position_features=names)):
        for names in (("relative", "relative"), ("relative", "middle")):
            with pytest.raises(ValueError, match=r"position_features must be distinct names among"):
                build(names)


def test_a_fit_reads_where_tokens_sit_when_that_is_what_decides():
    """Targets that depend only on a token's place: a fit with position features ranks them, one on the hidden
    states alone cannot (the hidden states here are noise)."""
    model = build_tiny_model("llama_gqa")
    shape = PredictorShape.of(model.config)
    gen = torch.Generator().manual_seed(0)

    def example(i: int, seq_len: int) -> ScorerExample:
        positions = torch.arange(4, seq_len)
        inputs = torch.randn(2, positions.numel(), shape.hidden_size, generator=gen).half()
        rel = positions.float() / seq_len  # head 0 keeps the end, head 1 the start, at every length
        targets = torch.stack([4.0 * rel - 6.0, -4.0 * rel - 3.0])[None].expand(2, -1, -1)
        return ScorerExample(f"r{i}", inputs, targets.clone(), positions, seq_len)

    train, held_out = [example(i, 100 + 20 * i) for i in range(6)], [example(9, 260)]
    placed = heldout_metrics(fit_predictor(train, "linear", shape), held_out)
    blind = heldout_metrics(fit_predictor(train, "linear", shape, FitOptions(position_features=())), held_out)
    assert min(placed["spearman"]) > 0.99 and max(blind["spearman"]) < 0.3


def test_scorer_files_record_the_position_features_they_read(tmp_path):
    model = build_tiny_model("llama_gqa")
    placed = random_predictor(model, position_features=("log_distance", "relative"))
    folder = placed.save(tmp_path / "placed")
    meta = json.loads((folder / "scorer.json").read_text())
    assert meta["position_features"] == ["log_distance", "relative"] and meta["format"] == 2
    loaded = load_predictor(folder)
    hidden, positions = torch.randn(30, model.config.hidden_size), torch.arange(70, 100)
    assert loaded.position_features == placed.position_features and loaded.digest == placed.digest
    torch.testing.assert_close(loaded.log_scores(1, hidden, positions, 100), placed.log_scores(1, hidden, positions, 100))
    # the same weights read as other features are another scorer
    swapped = random_predictor(model, position_features=("relative", "log_distance"))
    assert swapped.digest != placed.digest
    # a hidden-only scorer of format 1 (no position_features field) still loads, with its old digest
    plain = random_predictor(model)
    old = plain.save(tmp_path / "old")
    meta = json.loads((old / "scorer.json").read_text())
    del meta["position_features"]
    (old / "scorer.json").write_text(json.dumps({**meta, "format": 1}))
    assert load_predictor(old).position_features == () and load_predictor(old).digest == plain.digest
    meta = json.loads((folder / "scorer.json").read_text())
    (folder / "scorer.json").write_text(json.dumps({**meta, "position_features": ["relative", "middle"]}))
    with pytest.raises(ValueError, match=r"scorer position_features must be distinct names among .*'middle'"):
        load_predictor(folder)
    (folder / "scorer.json").write_text(json.dumps({**meta, "position_features": "relative"}))
    with pytest.raises(ValueError, match="position_features must be a list of names"):
        load_predictor(folder)
