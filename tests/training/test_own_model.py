"""A user's own model end to end (issue 25, item 3): `train --model FOLDER` on a tiny random Qwen3 (q/k norms)
saved as a local Hugging Face folder, on a real local Ray with SQLite Optuna and MLflow stores; then
`generate --policy models:/...`, `eval` and the service use the controller registered for it, the registry keeps
it under that model's own registered model, and a Phi-3 of the very same KV shape is refused, naming both.
A tiny Gemma-3 (sliding-window and global layers) is trained the same way: its controller plans with the model's
windows, within budget, real bytes equal to the prediction, and its identity plan decodes as plain greedy."""

from __future__ import annotations

import asyncio
import re
import json

import pytest

from conftest import build_family_model
from test_training import _config, ray_local  # noqa: F401  (fixtures)

# ~300 tiny-BPE tokens of plain English
PROMPT = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 12).strip()
# ~230 tokens: within the lengths the Gemma-3 controller is trained on (200) and past its 24-token windows
SHORT_PROMPT = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 6).strip()


def _save(folder, model, tokenizer_bos):
    tokenizer = tokenizer_bos.__class__(tokenizer_object=tokenizer_bos.backend_tokenizer, bos_token="<s>",
                                        eos_token="</s>")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _folder(tmp_path_factory, tokenizer_bos, family: str):
    return _save(tmp_path_factory.mktemp(family) / f"tiny-{family}", build_family_model(family), tokenizer_bos)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_tokenizer_bos):
    return _folder(tmp_path_factory, tiny_tokenizer_bos, "qwen3")


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory, tiny_tokenizer_bos):
    # Phi-3 here has Qwen3's 3 layers x 2 KV heads x head_dim 16: only the recorded identity tells them apart
    return _folder(tmp_path_factory, tiny_tokenizer_bos, "phi3")


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from adaptive_kv.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_for_a_qwen3_folder_then_generate_eval_and_serve_with_its_champion(qwen_dir, phi_dir, tmp_path, ray_local,
                                                                                  monkeypatch, capsys):
    from mlflow import MlflowClient
    from transformers import AutoConfig

    from adaptive_kv.model_identity import ModelIdentity
    from adaptive_kv.policies.controller.files import load_controller
    from adaptive_kv.policies.controller.registry import (BASE_MODEL_FINGERPRINT_TAG, DEFAULT_REGISTERED_MODEL,
                                                          bind_registered_model, registered_model_name)
    from adaptive_kv.services.engine import Engine, EngineConfig, EngineError, GenerationRequest
    from adaptive_kv.services.policy_source import PolicySpec
    from adaptive_kv.training.train import run_train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where generate and serve fetch models:/ URIs from
    monkeypatch.setenv("ADAPTIVE_KV_CACHE", str(tmp_path / "cache"))
    summary = run_train(_config(qwen_dir, tmp_path / "train", mlflow_uri=uri, trials=1, smoke_test=False),
                        log=lambda *a: None)

    # the controller records the model it was trained for, and is registered under that model's own name
    identity = ModelIdentity.of(AutoConfig.from_pretrained(qwen_dir), str(qwen_dir))
    assert load_controller(summary["controller"])[0].base_model == identity
    name = summary["registered_model"]
    assert name == registered_model_name(identity) and name.startswith(f"{DEFAULT_REGISTERED_MODEL}-tiny-qwen3-")
    client = MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == summary["model_version"]
    assert client.get_registered_model(name).tags[BASE_MODEL_FINGERPRINT_TAG] == identity.fingerprint
    assert [m.name for m in client.search_registered_models()] == [name]  # no champion under the embedded model's
    phi3 = ModelIdentity.of(AutoConfig.from_pretrained(phi_dir), str(phi_dir))
    with pytest.raises(ValueError, match=rf"registered model '{name}' holds controllers of '{qwen_dir}' \(qwen3"
                                         rf".*not of '{phi_dir}' \(phi3"):
        bind_registered_model(name, phi3)  # a champion of another model cannot land here

    champion = f"models:/{name}@champion"
    code, out, err = _cli(["generate", "--model", str(qwen_dir), "--policy", champion, "--budget", "0.5",
                           "--max-new-tokens", "2", "--raw", "--json", PROMPT], capsys)
    assert code == 0, err
    kv = json.loads(out)["kv"]
    assert 0 < kv["bytes"] <= 0.5 * kv["full_bytes"]

    code, out, err = _cli(["eval", "--model", str(qwen_dir), "--policies", f"learned:path={summary['controller']}",
                           "--budgets", "0.5", "--tasks", "passkey", "--context-length", "200", "--samples", "1",
                           "--max-new-tokens", "4", "--output", str(tmp_path / "eval"), "--json"], capsys)
    assert code == 0, err
    (row,) = [r for r in json.loads(out)["records"] if r["policy"].startswith("learned")]
    assert row["score"] is not None and 0 < row["kv_bytes"] <= 0.5 * row["full_kv_bytes"]

    engine = Engine(EngineConfig(model=str(qwen_dir), policy=PolicySpec(uri=champion), budget=0.5, threads=1))
    engine.start()
    try:
        done = asyncio.run(engine.complete(GenerationRequest(engine.encode_text(PROMPT), 2)))
        assert done.completion_tokens == 2 and done.kv["policy"] == f"learned:{champion}"
    finally:
        engine.close()

    # the same champion on a model of another family: refused by generate, eval and serve, naming both models
    both = rf"trained for '{qwen_dir}' \(qwen3.*this model is '{phi_dir}' \(phi3"
    code, _, err = _cli(["generate", "--model", str(phi_dir), "--policy", champion, "--max-new-tokens", "2", "--raw",
                         PROMPT], capsys)
    assert code == 2 and re.search(both, err), err
    code, _, err = _cli(["eval", "--model", str(phi_dir), "--policies", f"learned:path={summary['controller']}",
                         "--budgets", "0.5", "--tasks", "passkey", "--context-length", "200", "--samples", "1",
                         "--output", str(tmp_path / "eval-other")], capsys)
    assert code == 2 and re.search(both, err), err
    with pytest.raises(EngineError, match=both):
        Engine(EngineConfig(model=str(phi_dir), policy=PolicySpec(uri=champion), threads=1)).start()


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tiny_tokenizer_bos):
    return _folder(tmp_path_factory, tiny_tokenizer_bos, "gemma3")


def test_train_for_a_gemma3_folder_with_sliding_window_layers(gemma_dir, tmp_path, ray_local, monkeypatch, capsys):
    import torch

    import adaptive_kv
    from adaptive_kv import CompressedCache, Plan
    from adaptive_kv.cache import sliding_windows
    from adaptive_kv.policies import get_policy
    from adaptive_kv.prefill import cache_inputs
    from adaptive_kv.training.train import run_train
    from conftest import FAMILY_WINDOW

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ADAPTIVE_KV_CACHE", str(tmp_path / "cache"))
    # labels, the trial's validation and the champion's scoring all plan on the Ray workers: each plan carries
    # the model's windows, or the workers' caches refuse it
    summary = run_train(_config(gemma_dir, tmp_path / "train", mlflow_uri=uri, trials=1, smoke_test=False),
                        log=lambda *a: None)
    assert summary["best_score"] > 0

    model, tokenizer = adaptive_kv.load_model(str(gemma_dir))
    windows = sliding_windows(model.config)
    assert windows == (FAMILY_WINDOW, None, FAMILY_WINDOW)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    policy = get_policy("learned", path=summary["controller"])
    ids = tokenizer(SHORT_PROMPT).input_ids
    assert len(ids) > 4 * FAMILY_WINDOW
    for budget in (0.5, 0.25):
        cache = CompressedCache(model, plan_provider=lambda stats: policy.plan(stats, budget),
                                **cache_inputs(tokenizer, ids, policy.stats_config()))
        with torch.no_grad():
            model(torch.tensor([ids]), cache=cache)
        plan = cache.plan
        assert plan.windows == windows
        assert all(b.keep is None or b.keep < FAMILY_WINDOW for layer in (0, 2) for b in plan.heads[layer])
        shape = cache.stats  # the KV shape the plan was made for: head size and bytes of the cached states
        predicted = plan.nbytes(len(ids), shape.head_dim, shape.dtype_bytes)
        assert cache.nbytes() == predicted <= budget * cache.full_nbytes()
        assert cache.full_nbytes() == plan.full_nbytes(len(ids), shape.head_dim, shape.dtype_bytes)

    # the registered champion, as a user runs it
    code, out, err = _cli(["generate", "--model", str(gemma_dir), "--policy", f"models:/{summary['registered_model']}"
                           "@champion", "--budget", "0.5", "--max-new-tokens", "2", "--raw", "--json", SHORT_PROMPT], capsys)
    assert code == 0, err
    kv = json.loads(out)["kv"]
    assert 0 < kv["bytes"] <= 0.5 * kv["full_bytes"]

    # the model as train loaded it: the identity plan (with its windows) decodes past the window as plain greedy
    context = torch.tensor([ids[:64]])
    with torch.no_grad():
        reference = model.generate(context, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        identity = CompressedCache(model, plan=Plan.full(layers, heads, windows=windows))
        assert torch.equal(model.generate(context, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                          cache=identity), reference)
