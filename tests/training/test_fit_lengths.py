"""Training across context lengths: requests of several lengths, weighed in the fit as the search chooses."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive_kv.plan import Layout
from adaptive_kv.policies.controller.files import ControllerConfig
from adaptive_kv.policies.controller.options import option_grid
from adaptive_kv.stats import FEATURE_NAMES
from adaptive_kv.training.fit import DISTORTION_FLOOR, FitConfig, fit, length_weights
from adaptive_kv.training.labels import RequestLabels

LAYERS, HEADS = 2, 2


def _labels(seq_len: int, distortion: float, features: torch.Tensor) -> RequestLabels:
    options = len(option_grid())
    return RequestLabels(f"niah_single/query_agnostic/{seq_len}/10000/0", "niah_single", "query_agnostic", seq_len,
                         features, FEATURE_NAMES, torch.full((LAYERS, HEADS, options), distortion))


def _config() -> ControllerConfig:
    layout = Layout(sink_tokens=4, recent_window=8, group_size=16, scorer="snapkv", selection="per_head")
    return ControllerConfig(model_shape=dict(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=16),
                            feature_names=FEATURE_NAMES, grid=option_grid(), layout=layout,
                            layer_weights=(1.0,) * LAYERS, hidden=16, layers=1)


def test_length_weights_equal_a_hand_computation():
    features = torch.zeros(LAYERS, HEADS, len(FEATURE_NAMES))
    labels = [_labels(1000, 0.1, features), _labels(4000, 0.1, features), _labels(2000, 0.1, features)]
    # raw weights (n / 1000)^0.5 = 1, 2, sqrt(2); each request has 4 rows; scaled to mean 1
    raw = [1.0, 2.0, math.sqrt(2.0)]
    want = torch.tensor([r / (sum(raw) / 3) for r in raw for _ in range(LAYERS * HEADS)])
    assert torch.allclose(length_weights(labels, 0.5), want)
    assert torch.equal(length_weights(labels, 0.0), torch.ones(12))


@pytest.mark.parametrize("exponent", [0.0, 2.0, -2.0])
def test_the_fit_weighs_requests_by_length(exponent):
    """Two requests with the same features and different distortions: the least-squares fit predicts their
    mean weighted by (n / shortest)^exponent, so the long request's target wins at exponent 2 and the short
    one's at -2 (a fit ignoring the weights predicts the plain mean at every exponent)."""
    features = torch.rand(LAYERS, HEADS, len(FEATURE_NAMES), generator=torch.Generator().manual_seed(0))
    short, long = _labels(1000, 1e-4, features), _labels(4000, 1e-1, features)
    net, _ = fit(_config(), FitConfig(epochs=150, lr=1e-2, batch_size=64, loss="mse", length_weight=exponent),
                 [short, long], [])
    w_short, w_long = 1.0, 4.0**exponent
    log_short, log_long = math.log(1e-4 + DISTORTION_FLOOR), math.log(1e-1 + DISTORTION_FLOOR)
    want = (w_short * log_short + w_long * log_long) / (w_short + w_long)
    x = features.reshape(LAYERS * HEADS, -1)
    with torch.no_grad():
        predicted = net(x, torch.arange(LAYERS * HEADS))
    assert predicted.mean().item() == pytest.approx(want, abs=0.15)


@pytest.mark.parametrize("argv, message", [
    (["train", "--context-lengths", "1024,32"], "context_lengths must be distinct lengths in [64, 16384] tokens, "
                                                "got (1024, 32)"),
    (["train", "--context-lengths", "1024,2048,1024"], "got (1024, 2048, 1024)"),
])
def test_bad_context_lengths_are_refused_in_one_line(argv, message, capsys):
    from adaptive_kv.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_requests_at_two_lengths_have_distinct_keys(tiny_tokenizer_bos):
    """The label cache and the plan figures key requests by `key`: the same sample index at two lengths
    must not collide."""
    from adaptive_kv.training.calibration import make_requests

    made = {n: make_requests(tiny_tokenizer_bos, tasks=("passkey", "fidelity"), context_length=n, per_task=1,
                             seed=10_000) for n in (160, 240)}
    keys = [r.key for n in made for r in made[n]]
    assert len(keys) == 6 and len(set(keys)) == len(keys)
    assert all(r.length == n for n in made for r in made[n])
