"""Every policy end to end on CUDA, against the same run on CPU (tier 3: skipped without a GPU).

Run on a lent GPU by `benchmarks/gpu_check.sh`. The CPU run is the reference: a CUDA run must
hold the same real bytes (== the plan's prediction) and produce the same logits within float
tolerance, on the torch backend and on the compiled Triton kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (tier 3, run by benchmarks/gpu_check.sh on a lent GPU)", allow_module_level=True)

from adaptive_kv import CompressedCache  # noqa: E402
from adaptive_kv.policies import available_policies, get_policy  # noqa: E402
from adaptive_kv.reconstruction import ReconstructionRequest  # noqa: E402
from conftest import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.gpu
BUDGET = 0.25
# fp32 on both devices (TF32 is off for matmuls by default). Measured on an H200: the two CUDA
# backends agree to float rounding; end to end, a CUDA run against the CPU one diverged by up to
# 0.19 for snapkv-scored policies (a near-tie in a ranking keeps another token), so the device
# comparison executes the CPU's plan and scores on CUDA.
BACKEND_ATOL = 1e-4
DEVICE_ATOL = 1e-3  # same plan and kept tokens on both devices; fp32 kernels differ in summation order


def _run(model, policy, device: str, backend: str, assembled: bool | None = None) -> tuple[torch.Tensor, int, int]:
    """Prefill 300 tokens, then 20 decode steps (flushes, H2O evictions): (logits, real, predicted bytes)."""
    model = model.to(device)
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(0)).to(device)
    request = None
    if policy.stats_config().reconstruction:
        request = ReconstructionRequest(tuple(ids[0].tolist()), (5, 6, 7), (8, 9))

    def provider(stats):
        return policy.plan(stats, BUDGET)

    cache = CompressedCache(model, plan_provider=provider, stats_config=policy.stats_config(),
                            reconstruction=request, backend=backend, assembled=assembled)
    logits = []
    with torch.no_grad():
        out = model(ids, cache=cache)
        predicted = cache.predicted_nbytes()
        real = cache.nbytes()
        logits.append(out.logits[0, -1])
        for step in range(20):
            token = torch.tensor([[7 + step]], device=device)
            logits.append(model(token, cache=cache).logits[0, -1])
    return torch.stack(logits).cpu(), real, predicted


_POLICIES = [n for n in available_policies() if n not in ("full", "learned", "kvzap")]  # kvzap: test_predicted_reconstruction


@pytest.mark.parametrize("name", _POLICIES)
def test_triton_matches_torch_on_cuda(name):
    policy = get_policy(name)
    model = build_tiny_model("llama_gqa")
    want, want_real, want_predicted = _run(model, policy, "cuda", "torch")
    got, real, predicted = _run(model, policy, "cuda", "triton")
    assert real == predicted == want_real == want_predicted
    torch.testing.assert_close(got, want, atol=BACKEND_ATOL, rtol=0)


def _captured(model, policy, device: str) -> tuple[CompressedCache, torch.Tensor]:
    """A capturing prefill of the test prompt on `device`: (cache, last logits)."""
    model = model.to(device)
    ids = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(0)).to(device)
    request = ReconstructionRequest(tuple(ids[0].tolist()), (5, 6, 7), (8, 9)) if policy.stats_config().reconstruction else None
    cache = CompressedCache(model, capture=True, stats_config=policy.stats_config(), reconstruction=request)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits[0, -1]
    return cache, logits


@pytest.mark.parametrize("name", _POLICIES)
def test_cuda_matches_cpu(name):
    """The CPU's plan and token scores, executed on CUDA: same bytes, same logits at every step.

    The scores are the CPU's so that a near-tie in a ranking (which the two devices may break
    apart, measured: snapkv-scored policies then drift by up to 0.19) cannot pick other tokens.
    """
    policy = get_policy(name)
    model = build_tiny_model("llama_gqa")
    logits = {}
    cpu, _ = _captured(model, policy, "cpu")
    plan = policy.plan(cpu.stats, BUDGET)
    gpu, _ = _captured(model, policy, "cuda")
    gpu.stats = dataclasses.replace(gpu.stats, token_scores={k: v.cuda() for k, v in cpu.stats.token_scores.items()})
    for device, captured in (("cpu", cpu), ("cuda", gpu)):
        model = model.to(device)
        cache, steps = captured.fork(plan), []
        assert cache.nbytes() == plan.nbytes(300, 16, 4)  # real bytes as planned, on both devices
        with torch.no_grad():
            for step in range(20):  # no decode-time eviction yet (the slack is one group)
                steps.append(model(torch.tensor([[7 + step]], device=device), cache=cache).logits[0, -1].cpu())
        logits[device] = (torch.stack(steps), cache.nbytes())
    assert logits["cuda"][1] == logits["cpu"][1]
    torch.testing.assert_close(logits["cuda"][0], logits["cpu"][0], atol=DEVICE_ATOL, rtol=0)


@pytest.mark.parametrize("name", _POLICIES)
def test_assembled_path_on_cuda_matches_packed(name):
    policy = get_policy(name)
    model = build_tiny_model("llama_gqa")
    want, want_real, _ = _run(model, policy, "cuda", "torch", assembled=False)
    got, real, _ = _run(model, policy, "cuda", "torch", assembled=True)
    assert real == want_real
    torch.testing.assert_close(got, want, atol=BACKEND_ATOL, rtol=0)
