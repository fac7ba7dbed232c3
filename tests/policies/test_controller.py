"""Controller files, the learned policy and calibration seeds (tier 1)."""

import json

import pytest
import torch

from adaptive_kv.plan import Layout
from adaptive_kv.policies import get_policy
from adaptive_kv.policies.controller.files import ControllerConfig, load_controller, save_controller
from adaptive_kv.policies.learned import Learned
from adaptive_kv.policies.controller.options import option_grid
from adaptive_kv.stats import FEATURE_NAMES, AttentionStats
from adaptive_kv.training.calibration import EVALUATION_SEEDS, CALIBRATION_SEED, VALIDATION_SEED, make_requests
from conftest import hand_made_stats

LAYOUT = dict(sink_tokens=4, recent_window=8, group_size=16, scorer="snapkv", selection="per_head")


def _config(layers=2, heads=2, head_dim=16) -> ControllerConfig:
    return ControllerConfig(
        model_shape=dict(num_layers=layers, num_kv_heads=heads, head_dim=head_dim), feature_names=FEATURE_NAMES,
        grid=option_grid(), layout=Layout(**LAYOUT), layer_weights=(1.0,) * layers, hidden=16, layers=1,
    )


def _stats(layers=2, heads=2, seq_len=300, head_dim=16) -> AttentionStats:
    features = torch.rand(layers, heads, len(FEATURE_NAMES), generator=torch.Generator().manual_seed(0))
    return hand_made_stats(layers, heads, seq_len, features=features, head_dim=head_dim)


@pytest.fixture
def controller(tmp_path):
    torch.manual_seed(0)
    config = _config()
    net = config.build()
    save_controller(tmp_path / "c", config, net)
    return tmp_path / "c", config, net


def test_round_trip_gives_the_same_plans(controller):
    folder, config, net = controller
    loaded_config, loaded_net = load_controller(folder)
    assert loaded_config == config
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded_net.state_dict().items()):
        assert torch.equal(a, b), k
    policy = get_policy("learned", path=str(folder))
    assert policy.plan(_stats(), 0.3) == Learned.from_parts(config, net).plan(
        _stats(), 0.3)
    assert net.num_parameters() < 100_000
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.pt"))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_folded_network_equals_the_module(layers):
    # the decision path runs the folded form; it must compute the module's function (normalisation,
    # head embedding and every layer), for any run of head identities
    torch.manual_seed(layers)
    config = ControllerConfig(
        model_shape=dict(num_layers=4, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES, grid=option_grid(),
        layout=Layout(**LAYOUT), layer_weights=(1.0,) * 4, hidden=16, layers=layers)
    net = config.build().eval()
    with torch.no_grad():
        net.feature_mean.normal_()
        net.feature_std.uniform_(0.5, 2.0)
    features = torch.randn(4, len(FEATURE_NAMES))
    folded = net.folded()
    with torch.no_grad():
        for first in (0, 2, 4):
            expected = net(features, torch.arange(first, first + 4))
            torch.testing.assert_close(folded(features, first), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [0.6, 0.3, 0.15, 0.1])
def test_learned_plans_meet_the_budget(controller, budget):
    folder, _, _ = controller
    plan = get_policy("learned", path=str(folder)).plan(_stats(), budget)
    assert plan.nbytes(300, 16, 4) <= budget * plan.full_nbytes(300, 16, 4)


def test_infeasible_budget_names_the_minimum(controller):
    folder, _, _ = controller
    with pytest.raises(ValueError, match=r"budget 0.01 is below the minimum feasible 0\.\d+ for seq_len=300"):
        get_policy("learned", path=str(folder)).plan(_stats(), 0.01)


def test_bad_files_are_refused(controller, tmp_path):
    folder, config, _ = controller
    data = json.loads((folder / "controller.json").read_text())
    cases = {
        "version": ({**data, "version": 99}, "version 99 is not supported"),
        "field": ({**data, "extra": 1}, r"unknown controller config fields \['extra'\]"),
        "shape": ({**data, "hidden": 8}, "do not match its config"),
    }
    for name, (bad, message) in cases.items():
        target = tmp_path / name
        target.mkdir()
        (target / "controller.json").write_text(json.dumps(bad))
        (target / "controller.safetensors").write_bytes((folder / "controller.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            load_controller(target)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "controller.json").write_text(json.dumps(data))
    (corrupt / "controller.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="corrupt controller weights"):
        load_controller(corrupt)
    with pytest.raises(ValueError, match="controller file missing"):
        load_controller(tmp_path / "nowhere")


def test_mismatched_model_shape_is_refused(controller):
    folder, _, _ = controller
    policy = get_policy("learned", path=str(folder))
    with pytest.raises(ValueError, match="trained for 2 layers x 2 KV heads, the statistics have 3 x 2"):
        policy.plan(_stats(layers=3), 0.3)
    with pytest.raises(ValueError, match="trained for head_dim 16, got 64"):
        policy.plan(_stats(head_dim=64), 0.3)


def test_shipped_controller_loads_and_fits_the_embedded_model():
    policy = get_policy("learned")
    assert policy.config.model_shape == {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
    stats = AttentionStats(torch.zeros(30, 3, len(policy.feature_names)), {}, 1024, policy.feature_names,
                           head_dim=64, dtype_bytes=4)
    plan = policy.plan(stats, 0.125)
    assert plan.nbytes(1024, 64, 4) <= 0.125 * plan.full_nbytes(1024, 64, 4)


def test_calibration_seeds_are_disjoint_from_evaluation(tiny_tokenizer):
    assert CALIBRATION_SEED not in EVALUATION_SEEDS and VALIDATION_SEED not in EVALUATION_SEEDS
    assert 0 in EVALUATION_SEEDS  # `adaptive-kv eval --seed 0`, the committed figures
    with pytest.raises(ValueError, match="reserved for evaluation"):
        make_requests(tiny_tokenizer, tasks=("passkey",), context_length=200, per_task=1, seed=0)
    train = make_requests(tiny_tokenizer, tasks=("passkey",), context_length=200, per_task=2, seed=CALIBRATION_SEED)
    from adaptive_kv.tasks import make_samples

    held_out = {s.context_ids for s in make_samples("passkey", tiny_tokenizer, 200, 2, 0)}
    assert not held_out & {r.context_ids for r in train}


# ---------------------------------------------------------------- global options (KVzip's per-head counts)
def _global_config(layers=2, heads=2, head_dim=16) -> ControllerConfig:
    from adaptive_kv.stats import GLOBAL_SHARE_FRACTIONS, RECONSTRUCTION_FEATURES

    grid = option_grid(global_keeps=GLOBAL_SHARE_FRACTIONS)
    return ControllerConfig(
        model_shape=dict(num_layers=layers, num_kv_heads=heads, head_dim=head_dim),
        feature_names=FEATURE_NAMES + RECONSTRUCTION_FEATURES, grid=grid, layout=Layout(**LAYOUT),
        layer_weights=(1.0,) * layers, hidden=16, layers=1,
    )


def _global_stats(config: ControllerConfig, seq_len: int = 300) -> AttentionStats:
    gen = torch.Generator().manual_seed(1)
    features = torch.rand(2, 2, len(config.feature_names), generator=gen)
    return AttentionStats(features, {}, seq_len, config.feature_names, head_dim=16, dtype_bytes=4)


@pytest.mark.parametrize("budget", [0.5, 0.2, 0.1, 0.07])
def test_global_options_keep_each_heads_share_and_meet_the_budget(budget):
    torch.manual_seed(0)
    config = _global_config()
    net = config.build()
    stats = _global_stats(config)
    policy = Learned.from_parts(config, net)
    plan = policy.plan(stats, budget)
    assert plan.nbytes(300, 16, 4) <= budget * plan.full_nbytes(300, 16, 4)
    # the allocator's choice, recomputed: every head's keep is its option's (global: its own share x 300)
    cost = torch.exp(policy.predict(stats)).reshape(4, -1)
    floor = LAYOUT["sink_tokens"] + LAYOUT["recent_window"]
    for l in range(2):
        for h in range(2):
            budget_lh = plan.heads[l][h]
            kept = 300 if budget_lh.keep is None else budget_lh.keep
            candidates = []
            for option in config.grid:
                if (option.key_bits, option.value_bits) != (budget_lh.key_bits, budget_lh.value_bits):
                    continue
                if option.allocation == "global":
                    share = float(stats.feature(option.share_feature)[l, h])
                    candidates.append(min(300, max(floor, round(share * 300))))
                else:
                    candidates.append(300 if option.keep_fraction is None else max(floor, round(option.keep_fraction * 300)))
            assert kept in candidates
    assert cost.shape == (4, len(config.grid))


def test_global_options_are_chosen_when_predicted_cheaper():
    """With predictions favouring global options, heads hold their own shares (different keeps)."""
    config = _global_config()
    net = config.build()
    stats = _global_stats(config)
    policy = Learned.from_parts(config, net)
    # global options predicted best, the more bytes the better: the allocator fills each budget up
    favour = torch.tensor([-(o.keep_fraction * (o.key_bits + o.value_bits)) if o.allocation == "global" else 5.0
                           for o in config.grid])
    object.__setattr__(policy, "predict", lambda s, first_layer=0: favour.expand(2, 2, -1).clone())
    for budget in torch.linspace(0.12, 0.9, 27).tolist():  # every plan within its budget (bytes counted exactly)
        tight = policy.plan(stats, budget)
        assert tight.nbytes(300, 16, 4) <= budget * tight.full_nbytes(300, 16, 4), budget
    plan = policy.plan(stats, 0.5)
    floor = LAYOUT["sink_tokens"] + LAYOUT["recent_window"]
    allowed = {(l, h): {min(300, max(floor, round(float(stats.feature(f)[l, h]) * 300))) for f in
                        ("recon_global_top40", "recon_global_top20", "recon_global_top10", "recon_global_top5")}
               for l in range(2) for h in range(2)}
    for l in range(2):
        for h in range(2):
            kept = plan.heads[l][h].keep
            assert (300 if kept is None else kept) in allowed[(l, h)]
    assert plan.nbytes(300, 16, 4) <= 0.5 * plan.full_nbytes(300, 16, 4)


def test_global_grid_round_trips_and_bad_global_options_are_refused(tmp_path):
    config = _global_config()
    save_controller(tmp_path / "g", config, config.build())
    loaded, _ = load_controller(tmp_path / "g")
    assert loaded.grid == config.grid and sum(o.allocation == "global" for o in loaded.grid) == 20
    from adaptive_kv.policies.controller.options import HeadOption

    with pytest.raises(ValueError, match=r"global option's keep_fraction must be one of \(0.4, 0.2, 0.1, 0.05\)"):
        HeadOption(0.3, 4, 4, "global")
    with pytest.raises(ValueError, match="allocation must be one of"):
        HeadOption(0.2, 4, 4, "random")
    with pytest.raises(ValueError, match=r"global options read features \['recon_global_top10'"):
        ControllerConfig(model_shape=dict(num_layers=2, num_kv_heads=2, head_dim=16), feature_names=FEATURE_NAMES,
                         grid=option_grid(global_keeps=(0.1, 0.05)), layout=Layout(**LAYOUT), layer_weights=(1.0, 1.0))


@pytest.mark.parametrize("field, value, message", [
    ("hidden", 10**9, r"hidden must be an integer in \[1, 1024\], got 1000000000"),
    ("layers", 10**6, r"layers must be an integer in \[1, 16\], got 1000000"),
    ("embedding", 0, r"embedding must be an integer in \[1, 256\], got 0"),
    ("hidden", "64", r"hidden must be an integer in \[1, 1024\], got '64'"),
    ("model_shape", {"num_layers": 10**7, "num_kv_heads": 2, "head_dim": 16},
     r"model_shape.num_layers must be an integer in \[1, 1024\], got 10000000"),
    ("model_shape", {"num_layers": 2, "num_kv_heads": True, "head_dim": 16},
     r"model_shape.num_kv_heads must be an integer in \[1, 1024\], got True"),
    ("model_shape", {"num_layers": 2, "num_kv_heads": 2, "head_dim": 10**5},
     r"model_shape.head_dim must be an integer in \[1, 4096\], got 100000"),
    ("model_shape", [2, 2, 16], "model_shape must be an object, got list"),
    ("feature_names", ["f"] * 300, "feature_names must be 1 to 256 names, got 300 entries"),
    ("feature_names", [], "feature_names must be 1 to 256 names, got 0 entries"),
])
def test_every_size_in_a_controller_file_is_bounded_before_anything_is_built(controller, tmp_path, field, value,
                                                                             message, monkeypatch):
    from adaptive_kv.policies.controller import files

    folder, _, _ = controller
    data = json.loads((folder / "controller.json").read_text())
    (tmp_path / "controller.json").write_text(json.dumps({**data, field: value}))
    (tmp_path / "controller.safetensors").write_bytes((folder / "controller.safetensors").read_bytes())
    monkeypatch.setattr(files.ControllerConfig, "build", lambda self: pytest.fail("built before the checks"))
    with pytest.raises(ValueError, match=message):
        load_controller(tmp_path)


def test_weights_are_checked_by_their_header_before_the_network_is_built(controller, tmp_path, monkeypatch):
    from adaptive_kv.policies.controller import files

    folder, config, _ = controller
    data = json.loads((folder / "controller.json").read_text())
    (tmp_path / "controller.json").write_text(json.dumps({**data, "hidden": 1024, "layers": 16}))  # in bounds, wrong
    (tmp_path / "controller.safetensors").write_bytes((folder / "controller.safetensors").read_bytes())
    monkeypatch.setattr(files.ControllerConfig, "build", lambda self: pytest.fail("built before the header check"))
    with pytest.raises(ValueError, match="do not match its config"):
        load_controller(tmp_path)
    monkeypatch.setattr(files, "MAX_WEIGHTS_BYTES", 10)
    with pytest.raises(ValueError, match="over the 10-byte limit for a controller file"):
        load_controller(folder)


@pytest.mark.parametrize("hidden, layers, embedding", [(16, 1, 8), (32, 3, 4), (7, 2, 1)])
def test_expected_shapes_are_those_of_the_built_network(hidden, layers, embedding):
    import dataclasses

    from adaptive_kv.policies.controller.files import expected_shapes

    config = dataclasses.replace(_config(), hidden=hidden, layers=layers, embedding=embedding)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in config.build().state_dict().items()}
