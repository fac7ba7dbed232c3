"""Controllers and scorers know the model they were trained for (issue 25, item 3): the files record its
identity, and every cache built for them on another model refuses, naming both; the registry's names
keep each base model's controllers apart. Tier 1: tiny random models, no Ray, no MLflow store."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from adaptive_kv.generation import generate
from adaptive_kv.model_identity import ModelIdentity
from adaptive_kv.plan import Layout
from adaptive_kv.policies import get_policy
from adaptive_kv.policies.controller.files import ControllerConfig, load_controller, save_controller
from adaptive_kv.policies.controller.options import option_grid
from adaptive_kv.policies.controller.registry import DEFAULT_REGISTERED_MODEL, registered_model_name
from adaptive_kv.predicted_reconstruction import load_predictor
from adaptive_kv.prefill import capture, needs_of
from adaptive_kv.stats import FEATURE_NAMES
from conftest import build_family_model, random_predictor

LAYOUT = Layout(sink_tokens=4, recent_window=8, group_size=16, scorer="snapkv", selection="per_head")
IDS = list(range(5, 69))  # 64 tokens: more than sinks + window


def _save(folder, model, name: str | None, *, identity: bool = True):
    """A random controller for `model` (its identity under `name` recorded, or only its shape)."""
    base = ModelIdentity.of(model.config, name)
    config = ControllerConfig(model_shape=base.shape, feature_names=FEATURE_NAMES, grid=option_grid(), layout=LAYOUT,
                              layer_weights=(1.0,) * base.num_layers, hidden=16, layers=1, model_name=name or "",
                              base_model=base if identity else None)
    torch.manual_seed(0)
    return save_controller(folder, config, config.build())


@pytest.fixture(scope="module")
def qwen3():
    return build_family_model("qwen3")


@pytest.fixture(scope="module")
def phi3():
    # the same KV shape as the tiny Qwen3 (3 layers x 2 KV heads x head_dim 16): only the identity tells them apart
    return build_family_model("phi3")


def test_identity_tells_families_of_one_shape_apart_and_ignores_the_name(qwen3, phi3):
    a, b = ModelIdentity.of(qwen3.config, "tiny-qwen3"), ModelIdentity.of(phi3.config, "tiny-phi3")
    assert a.shape == b.shape == {"num_layers": 3, "num_kv_heads": 2, "head_dim": 16}
    assert not a.same_model(b)
    other = ModelIdentity.of(build_family_model("qwen3", seed=1).config, "/elsewhere/my-qwen3")  # other weights, name
    assert a.same_model(other) and a.fingerprint == other.fingerprint
    # a sliding window is part of what the model is
    gemma = build_family_model("gemma3")
    unslid = copy.deepcopy(gemma.config)
    unslid.layer_types = ["full_attention"] * 3
    assert not ModelIdentity.of(gemma.config).same_model(ModelIdentity.of(unslid))
    assert ModelIdentity.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_controller_files_record_the_model_and_refuse_another_naming_both(tmp_path, qwen3, phi3, tiny_tokenizer):
    folder = _save(tmp_path / "c", qwen3, "tiny-qwen3")
    config, _ = load_controller(folder)
    assert config.base_model == ModelIdentity.of(qwen3.config, "tiny-qwen3")
    assert json.loads((folder / "controller.json").read_text())["base_model"]["model_type"] == "qwen3"
    policy = get_policy("learned", path=str(folder))
    # on its own model it plans and generates
    out = generate(qwen3, tiny_tokenizer, IDS, plan_provider=lambda s: policy.plan(s, 0.5), max_new_tokens=2,
                   stats_config=policy.stats_config())
    assert 0 < out.kv["bytes"] <= 0.5 * out.kv["full_bytes"]
    # on a model of the same shape but another family it is refused before anything is planned
    phi3.config.name_or_path = "tiny-phi3"
    try:
        expected = r"controller .* was trained for 'tiny-qwen3' \(qwen3, 3 layers x 2 KV heads x head_dim 16.*this model is 'tiny-phi3' \(phi3"
        with pytest.raises(ValueError, match=expected):
            generate(phi3, tiny_tokenizer, IDS, plan_provider=lambda s: policy.plan(s, 0.5), max_new_tokens=2,
                     stats_config=policy.stats_config())
        with pytest.raises(ValueError, match=expected):  # the path eval, `plan` and the service prefill through
            capture(phi3, tiny_tokenizer, IDS, needs_of([get_policy("snapkv"), policy]))
        with pytest.raises(ValueError, match=expected):
            policy.check_model(phi3.config)
    finally:
        phi3.config.name_or_path = ""
    policy.check_model(qwen3.config)


def test_a_controller_without_identity_is_held_to_its_shape(tmp_path, qwen3, tiny_tokenizer):
    folder = _save(tmp_path / "old", qwen3, "tiny-qwen3", identity=False)
    assert "base_model" not in json.loads((folder / "controller.json").read_text())  # as files written before it
    policy = get_policy("learned", path=str(folder))
    llama = build_family_model("llama_gqa")  # 2 layers
    with pytest.raises(ValueError, match=r"controller .* was trained for 'tiny-qwen3' \(3 num_layers x 2 num_kv_heads "
                                         r"x 16 head_dim\); this model is .*llama, 2 layers"):
        capture(llama, tiny_tokenizer, IDS, needs_of([policy]))
    capture(qwen3, tiny_tokenizer, IDS, needs_of([policy]))


@pytest.mark.parametrize("field, value, message", [
    ("base_model", [1, 2], "base_model must be an object, got list"),
    ("base_model", {"name": "x"}, r"base_model must have exactly the fields .* missing \['fingerprint'"),
    ("fingerprint", "xyz", "base_model.fingerprint must be 16 hex digits, got 'xyz'"),
    ("num_layers", 4, "does not have model_shape"),
])
def test_bad_identity_in_a_controller_file_is_refused_by_field(tmp_path, qwen3, field, value, message):
    folder = _save(tmp_path / "c", qwen3, "tiny-qwen3")
    data = json.loads((folder / "controller.json").read_text())
    if field == "base_model":
        data["base_model"] = value
    else:
        data["base_model"][field] = value
    (folder / "controller.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_controller(folder)


def test_a_scorer_fitted_for_another_model_is_refused_naming_both(tmp_path, qwen3, phi3, tiny_tokenizer):
    scorer = dataclasses.replace(random_predictor(qwen3), base_model=ModelIdentity.of(qwen3.config, "tiny-qwen3"))
    scorer.save(tmp_path / "s")
    loaded = load_predictor(tmp_path / "s")
    assert loaded.base_model == scorer.base_model
    kvzap = get_policy("kvzap", path=str(tmp_path / "s"))
    capture(qwen3, tiny_tokenizer, IDS, needs_of([kvzap]))
    # phi3 has qwen3's layers, KV heads and hidden size: the shape alone let this scorer run on it
    with pytest.raises(ValueError, match=r"reconstruction scorer was trained for 'tiny-qwen3' \(qwen3.*this model is "
                                         r".*\(phi3"):
        capture(phi3, tiny_tokenizer, IDS, needs_of([kvzap]))


def test_the_shipped_controller_and_scorer_name_the_embedded_model():
    policy = get_policy("learned")
    for identity in (policy.config.base_model, policy.predictor.base_model):
        assert identity.name == "smollm2-135m" and identity.model_type == "llama"
        assert identity.shape == {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}


@pytest.mark.slow
def test_the_shipped_identity_is_the_embedded_models(smollm2):
    model, _ = smollm2
    policy = get_policy("learned")
    assert policy.config.base_model.same_model(ModelIdentity.of(model.config))
    policy.check_model(model.config)


def test_each_base_model_has_its_own_registered_model(qwen3, phi3):
    embedded = ModelIdentity("smollm2-135m", "llama", 30, 3, 64, "bf667ecc9b073077")
    assert registered_model_name(embedded) == DEFAULT_REGISTERED_MODEL  # compose and the quickstart serve this name
    a = registered_model_name(ModelIdentity.of(qwen3.config, "/models/tiny"))
    b = registered_model_name(ModelIdentity.of(phi3.config, "/other/tiny"))  # same folder name, another model
    assert a.startswith(f"{DEFAULT_REGISTERED_MODEL}-tiny-") and b.startswith(f"{DEFAULT_REGISTERED_MODEL}-tiny-")
    assert len({a, b, DEFAULT_REGISTERED_MODEL}) == 3
    assert registered_model_name(ModelIdentity.of(qwen3.config, "/copy/of/tiny")) == a  # a copy: the same model
