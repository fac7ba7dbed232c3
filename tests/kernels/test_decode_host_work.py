"""A compressed decode step does no host work that grows with the store, and never reads the device.

One step of one layer (`CompressedCache.update` + `attend`, the fused triton path; under
TRITON_INTERPRET=1 on CPU, compiled on CUDA) runs under two watchers:

* `HostReadGuard` fails on any read of tensor data by the host (`.item()`, `.tolist()`, `.cpu()`,
  `.numpy()`, `bool()`, `int()`, `float()` of a tensor), which on a GPU is a synchronisation;
  the interpreter's own copies (frames inside triton) are not the step's and are let through.
* `LaunchCounter` counts what would be kernel launches: every aten operator that computes
  (views excluded) and every Triton kernel launch. The count must not depend on the number of
  KV heads or of buckets (bit pairs) in the layer.

On CUDA the step also runs under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: @triton.jit reads it then

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from adaptive_kv import CompressedCache, HeadBudget, Plan  # noqa: E402
from adaptive_kv.kernels import triton_kernels as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
}
SINKS, WINDOW, GROUP, HEAD_DIM = 4, 16, 16, 16


def _inside_triton() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if f"{os.sep}triton{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class HostReadGuard(TorchFunctionMode):
    """Raise on any host read of tensor data outside Triton's own launch machinery."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and not _inside_triton():
            raise AssertionError(f"host read of a tensor in the decode step: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class LaunchCounter(TorchDispatchMode):
    """Count computing aten operators (not views) outside Triton's launch machinery."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if not is_view and not _inside_triton():
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_triton_launches():
    """Count launches of every Triton kernel in `triton_kernels` (by kernel name) while open."""
    launches: Counter[str] = Counter()

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]

    kernels = {name: getattr(K, name) for name in dir(K) if name.endswith("_kernel")}
    for name, kernel in kernels.items():
        setattr(K, name, Counted(name, kernel))
    try:
        yield launches
    finally:
        for name, kernel in kernels.items():
            setattr(K, name, kernel)


def _model(num_kv_heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HEAD_DIM * 2 * num_kv_heads, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2 * num_kv_heads, num_key_value_heads=num_kv_heads,
                         head_dim=HEAD_DIM, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def _plan(num_kv_heads: int, bit_pairs: list[tuple[int, int]], evict: bool) -> Plan:
    keep = 80 if evict else None
    heads = tuple(HeadBudget(keep, *bit_pairs[h % len(bit_pairs)]) for h in range(num_kv_heads))
    return Plan((heads,), sink_tokens=SINKS, recent_window=WINDOW, group_size=GROUP)


def _one_step(num_kv_heads: int, bit_pairs, evict: bool) -> tuple[Counter, Counter]:
    """Prefill, one warm decode step (builds the layout), then one watched step of layer 0."""
    model = _model(num_kv_heads)
    cache = CompressedCache(model, plan=_plan(num_kv_heads, bit_pairs, evict), backend="triton", assembled=False)
    ids = torch.randint(0, 64, (1, SINKS + WINDOW + 6 * GROUP), device=DEVICE)  # residual = the window: no flush due
    with torch.no_grad():
        model(ids, cache=cache)
    assert len(cache.layers[0].buckets) == len(set(bit_pairs) - {(16, 16)}) + ((16, 16) in bit_pairs)
    num_q = 2 * num_kv_heads

    def step():
        k, v = (torch.randn(1, num_kv_heads, 1, HEAD_DIM, device=DEVICE) for _ in range(2))
        query = torch.randn(1, num_q, 1, HEAD_DIM, device=DEVICE)
        layer_step, _ = cache.update(k, v, 0)
        return cache.attend(layer_step, query, HEAD_DIM**-0.5)

    step()
    sync_mode = torch.cuda.get_sync_debug_mode() if DEVICE == "cuda" else None
    with counting_triton_launches() as launches:
        counter = LaunchCounter()
        with HostReadGuard(), counter:
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                if DEVICE == "cuda":
                    torch.cuda.set_sync_debug_mode(sync_mode)
    return counter.ops, launches


@pytest.mark.parametrize("evict", [False, True])
def test_decode_step_reads_nothing_back_and_launches_a_fixed_set(evict):
    small_ops, small_launches = _one_step(2, [(4, 4)], evict)
    large_ops, large_launches = _one_step(8, [(2, 2), (4, 4), (8, 8), (4, 2), (16, 16)], evict)
    assert small_launches["layout_decode_kernel"] == 1 and small_launches["layout_merge_kernel"] == 1
    assert small_launches["layout_mass_kernel"] == int(evict)
    assert sum(small_launches.values()) == (3 if evict else 2)
    assert large_launches == small_launches  # 4x the heads, 5 buckets instead of 1
    assert large_ops == small_ops


def test_guard_catches_a_host_read():
    x = torch.arange(3, device=DEVICE)
    with HostReadGuard(), pytest.raises(AssertionError, match="tolist"):
        x.tolist()
    with HostReadGuard(), pytest.raises(AssertionError, match="__bool__"):
        bool(x[0] == 0)


def test_counter_sees_launches_per_head():
    # a step that loops over heads in Python launches more with more heads: the counter tells
    counts = []
    for heads in (2, 8):
        x = torch.randn(heads, 4, device=DEVICE)
        counter = LaunchCounter()
        with counter:
            torch.cat([x[h] * 2 for h in range(heads)])
        counts.append(sum(counter.ops.values()))
    assert counts == [3, 9]
