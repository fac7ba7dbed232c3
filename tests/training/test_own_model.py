"""A user's own model end to end (issue 25, item 3): `train --model FOLDER` on a tiny random Qwen3 (q/k norms)
saved as a local Hugging Face folder, on a real local Ray with SQLite Optuna and MLflow stores; then
`generate --policy models:/...`, `eval` and the service use the controller registered for it, the registry keeps
it under that model's own registered model, and a Phi-3 of the very same KV shape is refused, naming both.
A model with sliding-window layers is refused by `train` before any work (not supported yet)."""

from __future__ import annotations

import asyncio
import re
import json

import pytest

from conftest import build_family_model
from test_training import _config, ray_local  # noqa: F401  (fixtures)

# ~300 tiny-BPE tokens of plain English
PROMPT = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. " * 12).strip()


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


def test_train_refuses_a_model_with_sliding_window_layers_before_any_work(tmp_path, tiny_tokenizer_bos):
    from adaptive_kv.training.train import run_train

    folder = _save(tmp_path / "tiny-gemma3", build_family_model("gemma3"), tiny_tokenizer_bos)
    with pytest.raises(ValueError, match=r"train does not support sliding-window layers yet: model .*tiny-gemma3' "
                                         r"\(gemma3_text.* slides layers \[0, 2\]"):
        run_train(_config(folder, tmp_path / "train"), log=lambda *a: None)
    assert not (tmp_path / "train" / "optuna.db").exists()  # nothing started
