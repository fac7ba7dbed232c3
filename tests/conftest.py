"""Shared tier-1 fixtures: tiny tokenizers trained in code, no network."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when it is imported, and importing transformers' models imports
# triton: without CUDA, interpret the Triton kernels (tests/kernels/test_triton_kernels.py). This changes
# no default: the triton backend is used only when asked for by name or $ADAPTIVE_KV_BACKEND.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pydoc_data.topics  # noqa: E402
import pytest  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

# Small enough to train in well under a second, large enough that English
# words are a few tokens each (the length-fitting code must not assume 1:1).
_TINY_VOCAB_SIZE = 4096


def _train_tiny_bpe() -> Tokenizer:
    """Byte-level BPE trained on CPython's bundled pydoc topics (lossless decode)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


@pytest.fixture(scope="session")
def tiny_bpe_backend() -> Tokenizer:
    return _train_tiny_bpe()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bpe_backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer: has BOS/EOS tokens but never adds them."""
    backend = Tokenizer.from_str(tiny_bpe_backend.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_tokenizer_bos(tiny_bpe_backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer: prepends BOS when special tokens are requested."""
    backend = Tokenizer.from_str(tiny_bpe_backend.to_str())
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------- tiny random models (tier 1)
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

TINY_VOCAB = _TINY_VOCAB_SIZE


# Random init (std 0.02) gives attention logits of ~0.1: every head attends almost uniformly
# (normalised entropy 0.9999), so a wrong key or position barely moves the output and tests
# comparing logits cannot fail. Scaling W_q and W_k by 8 each (logits x64) gives entropies of
# 0.76-0.89 on 97 tokens: zeroed keys then move the logits by ~0.4 instead of ~5e-3.
QK_SHARPNESS = 8.0


def build_tiny_model(kind: str = "llama_gqa", seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM with sharp attention: llama_gqa (4 q / 2 kv heads), qwen2 (GQA, qkv
    bias, 1 kv head), llama_mha, or llama_hd64 (head_dim 64 > the tests' group size 16)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=4096, head_dim=16,
    )
    if kind == "llama_gqa":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common))
    elif kind == "llama_mha":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=4, num_key_value_heads=1, **common))
    elif kind == "llama_hd64":
        common.update(hidden_size=128, head_dim=64)
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(QK_SHARPNESS)
                if proj.bias is not None:
                    proj.bias.mul_(QK_SHARPNESS)
    return model.eval()


# The family matrix (tests/core/test_families.py): one tiny random model per architecture a user may
# bring. Sliding windows are small enough that a 64-token context and its decode run past them.
FAMILIES = ("llama_gqa", "llama_mha", "qwen2", "qwen2_sliding", "qwen3", "mistral", "gemma3", "phi3")
FAMILY_WINDOW = 24


def build_family_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `family` (FAMILIES) with sharp attention, in fp32 on CPU: Qwen3 and
    Gemma-3 normalise q and k (their norm weights are sharpened), Phi-3 fuses q/k/v in one projection,
    Mistral slides every layer, Gemma-3 alternates sliding and global layers and qwen2_sliding slides
    every layer above its first (`max_window_layers`), all by FAMILY_WINDOW."""
    if family in ("llama_gqa", "llama_mha", "qwen2"):
        return build_tiny_model(family, seed)
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, head_dim=16)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif family == "qwen2_sliding":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=FAMILY_WINDOW, max_window_layers=1,
                                             **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=FAMILY_WINDOW, **common))
    elif family == "gemma3":
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(sliding_window=FAMILY_WINDOW, layer_types=layer_types,
                                                   query_pre_attn_scalar=16, **common))
    elif family == "phi3":
        common.pop("head_dim")
        model = Phi3ForCausalLM(Phi3Config(pad_token_id=0, bos_token_id=0, eos_token_id=1, **common))
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if family == "phi3":  # fused rows: queries, then keys, then values
                q_and_k = attn.head_dim * (model.config.num_attention_heads + model.config.num_key_value_heads)
                attn.qkv_proj.weight[:q_and_k].mul_(QK_SHARPNESS)
            elif family == "gemma3":  # Gemma's RMSNorm scales by (1 + weight)
                for norm in (attn.q_norm, attn.k_norm):
                    norm.weight.add_(1).mul_(QK_SHARPNESS).sub_(1)
            elif family == "qwen3":
                for norm in (attn.q_norm, attn.k_norm):
                    norm.weight.mul_(QK_SHARPNESS)
            else:
                for proj in (attn.q_proj, attn.k_proj):
                    proj.weight.mul_(QK_SHARPNESS)
    return model.eval()


@pytest.fixture(scope="session", params=["llama_gqa", "qwen2", "llama_mha"])
def tiny_model(request) -> torch.nn.Module:
    return build_tiny_model(request.param)


@pytest.fixture(scope="session")
def llama_gqa() -> torch.nn.Module:
    return build_tiny_model("llama_gqa")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU), loaded once per session."""
    from adaptive_kv import load_model

    return load_model("smollm2-135m")


def random_predictor(model: torch.nn.Module, kind: str = "linear", seed: int = 0, width: int = 8,
                     position_features: tuple[str, ...] = ()):
    """A ReconstructionPredictor of random weights for `model`'s shape (what kvzap reads in tests), reading
    the hidden states and `position_features`."""
    from adaptive_kv.predicted_reconstruction import PredictorShape, ReconstructionPredictor

    shape = PredictorShape.of(model.config)
    gen = torch.Generator().manual_seed(seed)
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.hidden_size + len(position_features)
    weights = {"mean": torch.randn(L, D, generator=gen) * 0.1, "std": torch.rand(L, D, generator=gen) + 0.5}
    if kind == "linear":
        weights |= {"w": torch.randn(L, D, H, generator=gen) / D**0.5, "b": torch.full((L, H), -3.0)}
    else:
        weights |= {"w1": torch.randn(L, D, width, generator=gen) / D**0.5, "b1": torch.zeros(L, width),
                    "w2": torch.randn(L, width, H, generator=gen) / width**0.5, "b2": torch.full((L, H), -3.0)}
    return ReconstructionPredictor(kind, shape, weights, position_features=position_features)


_SCORER_FOLDERS: dict[int, str] = {}


def scorer_folder(model: torch.nn.Module) -> str:
    """A folder holding a random predictor for `model` (one per model object, in a temporary directory)."""
    import atexit
    import shutil
    import tempfile

    if id(model) not in _SCORER_FOLDERS:
        folder = tempfile.mkdtemp(prefix="adaptive-kv-scorer-")
        atexit.register(shutil.rmtree, folder, True)  # the session's runs leave no folders behind
        random_predictor(model).save(folder)
        _SCORER_FOLDERS[id(model)] = folder
    return _SCORER_FOLDERS[id(model)]


def hand_made_stats(layers: int = 2, heads: int = 2, seq_len: int = 300, *, features: dict | torch.Tensor | None = None,
                    scores: dict | None = None, head_dim: int = 16, dtype_bytes: int = 4):
    """AttentionStats made by hand: `features` is a full tensor, or {name: value} over zeros; every token
    scorer's scores are seeded random unless given in `scores`."""
    from adaptive_kv.plan import TOKEN_SCORERS
    from adaptive_kv.stats import FEATURE_NAMES, AttentionStats

    if not isinstance(features, torch.Tensor):
        named, features = features or {}, torch.zeros(layers, heads, len(FEATURE_NAMES))
        for name, value in named.items():
            features[..., FEATURE_NAMES.index(name)] = value
    gen = torch.Generator().manual_seed(0)
    token_scores = {s: torch.rand(layers, heads, seq_len, generator=gen) for s in TOKEN_SCORERS}
    return AttentionStats(features, {**token_scores, **(scores or {})}, seq_len, head_dim=head_dim,
                          dtype_bytes=dtype_bytes)


# ---------------------------------------------------------------- MLflow data stays in each test's tmp dirs
def _mlflow_data_in(root) -> set[str]:
    """MLflow files a process running in `root` writes by default: ./mlflow.db, and the experiment and run
    folders of ./mlruns (artifacts of a SQLite store whose experiment set no artifact location)."""
    from pathlib import Path

    found = {"mlflow.db"} if (Path(root) / "mlflow.db").exists() else set()
    mlruns = Path(root) / "mlruns"
    if mlruns.is_dir():
        for experiment in mlruns.iterdir():
            found.add(f"mlruns/{experiment.name}")
            if experiment.is_dir():
                found.update(f"mlruns/{experiment.name}/{run.name}" for run in experiment.iterdir())
    return found


@pytest.fixture(autouse=True)
def _no_mlflow_data_in_the_working_tree(request):
    """Fails the test (at teardown) that writes MLflow data into the folder pytest runs from."""
    root = request.config.invocation_params.dir
    before = _mlflow_data_in(root)
    yield
    written = sorted(_mlflow_data_in(root) - before)
    if written:
        pytest.fail(f"wrote MLflow data into {root}, outside its temporary directories: {written[:5]}")
