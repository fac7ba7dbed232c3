"""Training pipeline (tier 1): labels vs a direct computation, and `train` end to end on real local
Ray, SQLite Optuna and a local MLflow store, with a tiny model saved as a local HF folder."""

import copy
import json
import time

import pytest
import torch

from adaptive_kv.plan import Layout, Plan
from adaptive_kv.policies.controller.options import HeadOption
from adaptive_kv.stats import StatsConfig
from adaptive_kv.training.calibration import CalibrationRequest
from adaptive_kv.training.labels import LabelTarget, collect_labels, load_labels, save_labels
from conftest import build_tiny_model

LAYOUT = dict(sink_tokens=4, recent_window=8, group_size=16, scorer="snapkv", selection="shared")
# fp32 attention outputs of two independent computations (our batched softmax vs eager attention)
DISTORTION_ATOL = 1e-5


@torch.no_grad()
def _layer_outputs(model, ids: list[int], follow: list[int], kept: set[int] | None, layer: int = 0) -> torch.Tensor:
    """Layer `layer`'s attention outputs (before o_proj) for the `follow` positions, with eager attention
    and a 4-D mask that hides context positions outside `kept` from the follow queries in that layer
    only (the other layers see everything, so its inputs are the uncompressed ones, as in the labels)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    n, q = len(ids), len(follow)
    causal = torch.tril(torch.ones(n + q, n + q, dtype=torch.bool))
    allowed = causal.clone()
    if kept is not None:
        hidden = torch.tensor([p not in kept for p in range(n)])
        allowed[n:, :n] &= ~hidden
    as_mask = lambda ok: torch.zeros(1, 1, n + q, n + q).masked_fill(~ok, float("-inf"))  # noqa: E731
    full, masked = as_mask(causal), as_mask(allowed)
    hooks = [attn.register_forward_pre_hook(lambda module, args, kwargs, m=(masked if i == layer else full):
                                            (args, {**kwargs, "attention_mask": m}), with_kwargs=True)
             for i, attn in enumerate(l.self_attn for l in eager.model.layers)]
    captured = {}
    hooks.append(eager.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: captured.setdefault("x", args[0])))
    eager(torch.tensor([ids + follow]), attention_mask=full)
    for hook in hooks:
        hook.remove()
    heads = eager.config.num_attention_heads
    return captured["x"][0, n:].view(q, heads, -1).transpose(0, 1)  # (H_q, Q, D)


def _direct_distortion(model, got: torch.Tensor, reference: torch.Tensor, target: LabelTarget, rows: slice,
                       layer: int) -> torch.Tensor:
    """Per KV head distortion from a layer's pre-o_proj outputs (H_q, Q, D), computed the plain way: the
    residual error runs the model's own o_proj on the reference with one KV head's query heads swapped."""
    got, reference = got[:, rows], reference[:, rows]
    if target.error == "relative":
        per_head, ref = got.view(2, 2, *got.shape[1:]), reference.view(2, 2, *reference.shape[1:])  # (H_kv, G, Q, D)
        return (per_head - ref).pow(2).sum((1, 2, 3)) / ref.pow(2).sum((1, 2, 3))
    o_proj = model.model.layers[layer].self_attn.o_proj
    flat = lambda x: x.transpose(0, 1).reshape(x.shape[1], -1)  # noqa: E731  (Q, H_q*D), as attention hands it over
    full = o_proj(flat(reference))
    out = []
    for kv_head in range(2):
        swapped = reference.clone()
        swapped[2 * kv_head : 2 * kv_head + 2] = got[2 * kv_head : 2 * kv_head + 2]
        out.append((o_proj(flat(swapped)) - full).pow(2).sum() / full.pow(2).sum())
    return torch.stack(out)


@pytest.mark.parametrize("target", [LabelTarget("all", "relative"), LabelTarget("answer", "residual")])
def test_labels_equal_a_direct_computation(target):
    model = build_tiny_model("llama_gqa")
    ids = torch.randint(0, 1000, (120,), generator=torch.Generator().manual_seed(2)).tolist()
    follow = list(range(300, 316))
    request = CalibrationRequest("passkey", "query_agnostic", tuple(ids), tuple(follow), 4, 10_000, 0, len(ids))
    grid = (HeadOption(None, 16, 16), HeadOption(0.25, 16, 16), HeadOption(0.0, 16, 16), HeadOption(None, 4, 4))
    labels = collect_labels(model, None, request, grid, Layout(**LAYOUT), StatsConfig(sink_tokens=4, group_size=16), target)
    assert labels.distortion.shape == (2, 2, 4)
    assert torch.all(labels.distortion[..., 0] == 0)  # keep all, 16 bit: nothing changes
    assert torch.all(labels.distortion[..., 3] > 0)  # 4-bit keeps everything but is not exact
    from adaptive_kv.cache import CompressedCache
    from adaptive_kv.training.labels import option_plan

    captured = CompressedCache(model, capture=True, stats_config=StatsConfig(sink_tokens=4, group_size=16))
    with torch.no_grad():
        model(torch.tensor([ids]), cache=captured)
    rows = slice(None) if target.rows == "all" else slice(-5, -1)  # the 4 answer tokens are predicted by rows -5..-2
    for layer_idx in (0, 1):
        reference = _layer_outputs(model, ids, follow, None, layer_idx)
        for o in (1, 2):  # eviction only: a layer's distortion equals masking its evicted positions
            fork = captured.fork(option_plan(grid[o], 2, 2, 120, Layout(**LAYOUT)))
            layer = fork.layers[layer_idx]
            kept = set(range(4)) | {int(p) for p in layer.residual.positions}
            kept |= {int(p) for b in layer.buckets.values() for p in b.positions}
            got = _layer_outputs(model, ids, follow, kept, layer_idx)
            with torch.no_grad():
                direct = _direct_distortion(model, got, reference, target, rows, layer_idx)
            torch.testing.assert_close(labels.distortion[layer_idx, :, o], direct, atol=DISTORTION_ATOL, rtol=1e-4)
            assert direct.min() > 0


def test_global_option_labels_equal_each_heads_uniform_label(tiny_tokenizer):
    """A global option gives each head its own keep (its share of the global top); with per-head
    selection a head's tokens depend only on its own keep, so each head's label must equal its label
    under the uniform option of that keep (whose labels the test above checks directly)."""
    from adaptive_kv.policies.controller.options import option_keeps

    model = build_tiny_model("llama_gqa")
    ids = torch.randint(0, 1000, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    request = CalibrationRequest("passkey", "query_agnostic", tuple(ids), tuple(range(300, 316)), 4, 10_000, 0, len(ids))
    layout = Layout(**{**LAYOUT, "selection": "per_head"})
    stats_config = StatsConfig(sink_tokens=4, group_size=16, reconstruction=True)
    option = HeadOption(0.2, 4, 4, "global")
    labels = collect_labels(model, tiny_tokenizer, request, (option,), layout, stats_config)
    keeps = option_keeps((option,), labels.features, labels.feature_names, 200, 12)[..., 0]
    assert len(set(keeps.flatten().tolist())) > 1  # the heads really hold different counts
    for l in range(2):
        for h in range(2):
            uniform = HeadOption(int(keeps[l, h]) / 200, 4, 4) if keeps[l, h] < 200 else HeadOption(None, 4, 4)
            alone = collect_labels(model, tiny_tokenizer, request, (uniform,), layout, stats_config)
            torch.testing.assert_close(labels.distortion[l, h], alone.distortion[l, h], atol=1e-7, rtol=1e-5)


def test_validation_answer_score_equals_a_direct_computation():
    """The search's answer score: log p of the reference answer under a plan vs the uncompressed
    model, teacher-forced; checked against one plain forward over context + follow."""
    from transformers import DynamicCache

    from adaptive_kv.plan import Plan
    from adaptive_kv.training.objective import prepare_validation, score_plan

    model = build_tiny_model("llama_gqa")
    ids = torch.randint(0, 1000, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    follow = [7, 8, 9, 10]
    with torch.no_grad():  # the answer: the uncompressed model's own greedy tokens, so compression can only cost
        for _ in range(3):
            follow.append(int(model(torch.tensor([ids + follow])).logits[0, -1].argmax()))
    request = CalibrationRequest("niah_single", "query_agnostic", tuple(ids), tuple(follow), 3, 20_000, 0, len(ids))
    items = prepare_validation(model, None, [request], StatsConfig(sink_tokens=4, group_size=16), Layout(**LAYOUT))
    with torch.no_grad():  # direct: the answer's log-probabilities in one forward, no compression
        logits = model(torch.tensor([ids + follow]), cache=DynamicCache(config=model.config)).logits[0].float()
    direct = logits[len(ids) + len(follow) - 4 : -1].log_softmax(-1).gather(1, torch.tensor(follow[-3:])[:, None])
    assert score_plan(model, items[0], Plan.full(2, 2, **LAYOUT)) == pytest.approx(100.0)
    evicting = Plan.uniform(2, 2, keep=20, key_bits=2, value_bits=2, **LAYOUT)
    with torch.no_grad():
        cache = items[0].captured.fork(evicting)
        rows = torch.cat([items[0].last_logits, model(torch.tensor([follow]), cache=cache).logits[0, :-1]]).float()
    compressed = rows[-3:].log_softmax(-1).gather(1, torch.tensor(follow[-3:])[:, None])
    want = 100 * min(1.0, float(torch.exp((compressed - direct).mean())))
    assert score_plan(model, items[0], evicting) == pytest.approx(want, rel=1e-4)
    assert want < 99.9  # the plan really costs the answer something


@pytest.mark.parametrize("protocol", ["query_agnostic", "query_aware"])
def test_generated_validation_score_reads_the_answer_the_model_generates(tiny_tokenizer, protocol):
    """The `generated` objective scores the greedy answer as `eval` does: with the full plan it finds the
    text a plain greedy loop (no cache, no compression) generates after context + question, and not
    an answer the model does not give."""
    import dataclasses

    from adaptive_kv.training.objective import evaluate_policy, generated_score, prepare_validation, score_plan

    model = build_tiny_model("llama_gqa")
    ids = torch.randint(0, 1000, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    question, steps = [7, 8, 9, 10], 6
    greedy = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + question + greedy])).logits[0, -1].argmax())
            if token == tiny_tokenizer.eos_token_id:
                break
            greedy.append(token)
    said = tiny_tokenizer.decode(greedy, skip_special_tokens=True).strip()
    assert said, "the tiny model's greedy text is empty: pick another seed"
    answer = (11, 12)  # teacher-forced ids: the generated score never reads them
    if protocol == "query_agnostic":
        context, follow = ids, question + list(answer)
    else:
        context, follow = ids + question, list(answer)
    request = CalibrationRequest("niah_single", protocol, tuple(context), tuple(follow), len(answer), 20_000, 0,
                                 len(ids), answers=(said,), metric="string_match_all", max_new_tokens=steps)
    items = prepare_validation(model, tiny_tokenizer, [request], StatsConfig(sink_tokens=4, group_size=16),
                               Layout(**LAYOUT))
    full = Plan.full(2, 2, **LAYOUT)
    assert generated_score(model, tiny_tokenizer, items[0], full) == 100.0
    other = dataclasses.replace(items[0], request=dataclasses.replace(request, answers=("never said",)))
    assert generated_score(model, tiny_tokenizer, other, full) == 0.0
    result = evaluate_policy(model, [items[0], other], lambda stats, budget: full, (1.0,), "generated", tiny_tokenizer)
    assert result["objective"] == "generated" and result["by_budget"][1.0] == 50.0
    # the default objective scores the answer's likelihood (teacher-forced), whatever the model generates
    evicting = Plan.uniform(2, 2, keep=20, key_bits=2, value_bits=2, **LAYOUT)
    likelihood = evaluate_policy(model, [items[0], other], lambda stats, budget: evicting, (0.5,), tokenizer=tiny_tokenizer)
    want = [score_plan(model, items[0], evicting), score_plan(model, other, evicting)]
    assert likelihood["objective"] == "likelihood" and likelihood["samples"]["niah_single/0.5"] == want
    with pytest.raises(ValueError, match="give the tokenizer"):
        evaluate_policy(model, items, lambda stats, budget: full, (1.0,), "generated")
    bare = dataclasses.replace(items[0], request=dataclasses.replace(request, answers=(), metric="none"))
    with pytest.raises(ValueError, match="cannot be scored on a generated answer: it needs answers"):
        generated_score(model, tiny_tokenizer, bare, full)


@pytest.mark.parametrize("name", ["network", "selection", "full", "smoke"])
def test_named_search_spaces_suggest_valid_trials(name):
    """Every named space yields TrialConfigs from a real Optuna trial; a knob with several
    choices is searched, one with a single choice is fixed."""
    import optuna

    from adaptive_kv.training.search import SearchSpace, suggest

    space = SearchSpace.named(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        config = suggest(trial, space, 32, seed=0)
        assert config.selection in space.selection and config.grid in space.grid
        seen.add(config.selection)
        study.tell(trial, 0.0)
    assert seen == set(space.selection)
    assert ("selection" in study.trials[0].params) == (len(space.selection) > 1)
    with pytest.raises(ValueError, match="search space must be one of"):
        SearchSpace.named("everything")


def test_labels_round_trip(tmp_path):
    model = build_tiny_model("llama_gqa")
    request = CalibrationRequest("fidelity", "query_agnostic", tuple(range(100, 200)), tuple(range(5, 15)), 0, 10_000, 1, 100)
    labels = [collect_labels(model, None, request, (HeadOption(None, 16, 16), HeadOption(0.5, 2, 2)), Layout(**LAYOUT),
                             StatsConfig(sink_tokens=4, group_size=16))]
    save_labels(tmp_path / "l.safetensors", labels)
    (back,) = load_labels(tmp_path / "l.safetensors")
    assert back.key == labels[0].key and torch.equal(back.distortion, labels[0].distortion)
    assert torch.equal(back.features, labels[0].features) and back.feature_names == labels[0].feature_names


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_bos):
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer_bos.__class__(tokenizer_object=tiny_tokenizer_bos.backend_tokenizer,
                                             bos_token="<s>", eos_token="</s>")
    build_tiny_model("llama_gqa").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()


def _config(folder, out, **overrides):
    from adaptive_kv.training.search import SearchSpace
    from adaptive_kv.training.train import TrainConfig

    base = dict(model=str(folder), output=str(out), mlflow_uri=f"sqlite:///{out}/mlflow.db", workers=2,
                space=SearchSpace.smoke(), trials=2, context_lengths=(200,), group_size=16)
    return TrainConfig.smoke(**{**base, **overrides})


def test_train_smoke_end_to_end(tiny_model_dir, tmp_path, ray_local, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from adaptive_kv.policies import get_policy
    from adaptive_kv.policies.controller.registry import fetch_controller
    from adaptive_kv.training.train import run_train

    # the controller is trained on the predictions of a scorer fitted first, on the same workers and MLflow
    # smoke_test=False: a smoke run never registers, and this one checks the registration
    # requests at two lengths: the range the controller records spans them, and the search weighs them;
    # validation scores generated answers (the likelihood objective is the unit tests')
    summary = run_train(_config(tiny_model_dir, tmp_path, fit_scorer=True, reconstruction="predicted", smoke_test=False,
                                context_lengths=(160, 240), objective="generated"), log=lambda *a: None)
    scorer = tmp_path / "scorer_step" / "scorer"  # the scorer step ran first, on the same workers and MLflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    name = summary["registered_model"]  # this base model's own registered model
    version = client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == summary["model_version"]
    parent = client.get_run(summary["parent_run"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and all("score" in c.data.metrics and any(m.startswith("train_loss/") for m in c.data.metrics)
                                      for c in children)
    assert {c.data.params["reconstruction"] for c in children} == {"predicted"}
    assert {c.data.params["objective"] for c in children} == {"generated"}
    scored = json.loads((tmp_path / "figures" / "validation_scores.json").read_text())
    assert {result["objective"] for result in scored.values()} == {"generated"}  # the baselines' too
    assert all(-1.0 <= float(c.data.params["length_weight"]) <= 1.0 for c in children)
    assert len({c.data.params["length_weight"] for c in children}) == 2  # searched, not fixed
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/pareto.png", "figures/plans.png", "figures/label_statistics.json"} <= artifacts
    (scorer_run,) = client.search_runs([client.get_experiment_by_name("adaptive-kv-scorer").experiment_id])
    assert {"linear/spearman", "mlp/spearman", "linear/recall_top10"} <= set(scorer_run.data.metrics)
    assert len(client.get_metric_history(scorer_run.info.run_id, "linear/layer/spearman")) == 2  # one per layer
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "controller")} >= {
        "controller/controller.json", "controller/controller.safetensors", "controller/scorer.json",
        "controller/scorer.safetensors"}
    # the registered pyfunc serves plans, and the service's fetch gives a loadable controller
    monkeypatch.setenv("ADAPTIVE_KV_CACHE", str(tmp_path / "cache"))
    downloads = []
    download = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: downloads.append(kw) or download(**kw))
    folder = fetch_controller(f"models:/{name}@champion", uri)
    # a second fetch (a reload) reuses the finished download of that version and leaves nothing behind
    assert fetch_controller(f"models:/{name}@champion", uri) == folder
    assert fetch_controller(f"models:/{name}/{version.version}", uri) == folder
    assert len(downloads) == 1
    assert [p.name.startswith(".partial-") for p in (tmp_path / "cache" / "controllers").iterdir()] == [False]
    policy = get_policy("learned", path=str(folder))  # reads what it was trained on: the shipped scorer's predictions
    from transformers import AutoTokenizer

    from adaptive_kv.training.calibration import make_requests

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    made = [len(r.context_ids) for n in (160, 240) for seed in (10_000, 20_000)
            for r in make_requests(tokenizer, tasks=("passkey", "fidelity"), context_length=n, per_task=1, seed=seed)]
    trained = policy.config.notes["trained_range"]
    assert (trained["min_length"], trained["max_length"]) == (min(made), max(made)) and max(made) > 200
    from adaptive_kv.predicted_reconstruction import load_predictor

    fitted = load_predictor(scorer)
    assert policy.reconstruction == "predicted" and policy.predictor.kind == fitted.kind
    assert all(torch.equal(policy.predictor.weights[k], v) for k, v in fitted.weights.items())
    needs = policy.stats_config()
    assert needs.predictor is policy.predictor and needs.reconstruction is False  # no second pass
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    from adaptive_kv.stats import PREDICTED_FEATURES, RECONSTRUCTION_FEATURES, AttentionStats
    from adaptive_kv.training.tracking import example_input

    # the pyfunc takes features under the controller's own names; the policy reads their predicted twins
    names = policy.config.feature_names
    features = torch.rand(2, 2, len(names))
    stats = AttentionStats(features, {}, 200, names, head_dim=16, dtype_bytes=4)
    twins = dict(zip(RECONSTRUCTION_FEATURES, PREDICTED_FEATURES))  # by position, independently of PREDICTED_TWIN
    predicted = AttentionStats(features, {}, 200, tuple(twins.get(n, n) for n in names), head_dim=16, dtype_bytes=4)
    import pandas as pd

    out = model.predict(pd.DataFrame([example_input(stats, 0.3)]))
    assert Plan.from_json(out["plan"][0]).heads == policy.plan(predicted, 0.3).heads


def test_scorer_examples_are_kept_and_a_grown_run_computes_only_what_it_lacks(tiny_model_dir, tmp_path, ray_local):
    """`train-scorer` keeps each example as it is made: a rerun with another length reads the old ones
    back (a damaged file is made again) and computes only the new length's."""
    from transformers import AutoTokenizer

    from adaptive_kv.models import load_model
    from adaptive_kv.training import example_cache
    from adaptive_kv.training.label_cache import model_digest
    from adaptive_kv.training.scorer import collect_example
    from adaptive_kv.training.scorer_train import ScorerTrainConfig, run_train_scorer
    from adaptive_kv.predicted_reconstruction import POSITION_FEATURES

    common = dict(model=str(tiny_model_dir), tasks=("passkey", "fidelity"), train_per_task=1, valid_per_task=1,
                  sample_tokens=48, valid_tokens=64, kinds=("linear",), fractions=(1.0,), workers=2,
                  output=str(tmp_path / "scorer"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db")
    first = run_train_scorer(ScorerTrainConfig(**common, context_lengths=(160,)), log=lambda *a: None)
    folder = tmp_path / "scorer" / "examples"
    made = {p: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    assert first["examples_reused"] == 0 and len(made) == first["train_requests"] + first["valid_requests"] == 4
    # a cached example is the one a direct computation gives for that request, tokens drawn alike
    model, tokenizer = load_model(str(tiny_model_dir))
    train, _ = ScorerTrainConfig(**common, context_lengths=(160,)).requests(AutoTokenizer.from_pretrained(tiny_model_dir))
    key = example_cache.example_key(model_digest(model), train[1], 48, 1)
    direct = collect_example(model, tokenizer, train[1].context_ids, train[1].key, sample_tokens=48, seed=1)
    cached = example_cache.load(folder, key, train[1].key)
    assert torch.equal(cached.inputs, direct.inputs) and torch.equal(cached.targets, direct.targets)
    assert torch.equal(cached.positions, direct.positions) and cached.seq_len == direct.seq_len == len(train[1].context_ids)
    # a file without the tokens' positions (fits read them) is made again, not read as position-free
    from safetensors.torch import save_file

    (tmp_path / "old").mkdir()
    save_file({"inputs": direct.inputs, "targets": direct.targets}, str(example_cache.path_for(tmp_path / "old", key)),
              {"fingerprint": key})
    assert example_cache.load(tmp_path / "old", key, train[1].key) is None
    damaged = sorted(made)[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    grown = run_train_scorer(ScorerTrainConfig(**common, context_lengths=(160, 240)), log=lambda *a: None)
    assert grown["examples_reused"] == 3 and grown["train_requests"] + grown["valid_requests"] == 8
    now = {p: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    assert len(now) == 8 and [p for p in made if now[p] != made[p]] == [damaged]
    assert not list(folder.glob(".partial-*"))
    # the saved scorer records the span of its requests' context lengths (plans elsewhere say it)
    lengths = [len(r.context_ids) for split in ScorerTrainConfig(**common, context_lengths=(160, 240)).requests(
        AutoTokenizer.from_pretrained(tiny_model_dir)) for r in split]
    fitted = json.loads((tmp_path / "scorer" / "scorer" / "scorer.json").read_text())["fitted_lengths"]
    assert fitted == {"min_length": min(lengths), "max_length": max(lengths)} and max(lengths) > 200
    saved = json.loads((tmp_path / "scorer" / "scorer" / "scorer.json").read_text())["position_features"]
    assert tuple(saved) == POSITION_FEATURES  # where tokens sit is read unless --hidden-only says otherwise


def test_interrupted_study_resumes_without_losing_or_repeating_trials(tiny_model_dir, tmp_path, ray_local):
    import optuna
    from optuna.trial import TrialState

    from adaptive_kv.training.train import run_train

    run_train(_config(tiny_model_dir, tmp_path, trials=1, register=False, heartbeat_s=1), log=lambda *a: None)
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    study = optuna.load_study(study_name="adaptive-kv", storage=storage)
    first = [(t.number, t.value, t.params) for t in study.trials if t.state == TrialState.COMPLETE]
    stale = study.ask()  # a trial a killed driver left running: its last heartbeat is older than 3 intervals
    optuna.storages.RDBStorage(storage, heartbeat_interval=1).record_heartbeat(stale._trial_id)
    time.sleep(4)
    run_train(_config(tiny_model_dir, tmp_path, trials=3, register=False, heartbeat_s=1), log=lambda *a: None)
    study = optuna.load_study(study_name="adaptive-kv", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert [(t.number, t.value, t.params) for t in complete][:1] == first  # the finished trial is kept as it was
    assert [t.state for t in study.trials if t.number == 1] == [TrialState.FAIL]  # the stale one, failed
    retried = [optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) for t in complete]
    assert retried == [None, 1, None]  # and asked again once, next (RetryFailedTrialCallback)
    assert len({t.number for t in complete}) == 3
