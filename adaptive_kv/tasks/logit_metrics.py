"""Output-fidelity metrics on logits: compressed-cache vs full-cache predictions of the same tokens."""

from __future__ import annotations

import torch


def _check_logits(name: str, logits: torch.Tensor) -> None:
    """Logits must be a floating tensor shaped ``(..., vocab)`` with at least one position."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor")
    if logits.dim() < 1 or logits.numel() == 0:
        raise ValueError(f"{name} must have shape (..., vocab) with at least one position, got {tuple(logits.shape)}")


def _check_pair(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> None:
    """Both logits valid and of one shape."""
    _check_logits("ref_logits", ref_logits)
    _check_logits("test_logits", test_logits)
    if ref_logits.shape != test_logits.shape:
        raise ValueError(
            f"test_logits shape {tuple(test_logits.shape)} must equal ref_logits shape {tuple(ref_logits.shape)}"
        )


def kl_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean over positions of KL(ref || test) in nats; logits ``(..., vocab)``."""
    _check_pair(ref_logits, test_logits)
    # float64 log-softmax: bf16/fp16 logits would make near-zero KLs noise.
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    test_logp = torch.log_softmax(test_logits.double(), dim=-1)
    per_position = torch.sum(ref_logp.exp() * (ref_logp - test_logp), dim=-1)  # (...,)
    return float(per_position.mean())


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Percentage (0-100) of positions whose argmax token matches; logits ``(..., vocab)``."""
    _check_pair(ref_logits, test_logits)
    same = ref_logits.argmax(dim=-1) == test_logits.argmax(dim=-1)  # (...,)
    return 100.0 * float(same.double().mean())


def perplexity(logits: torch.Tensor, target_ids: torch.Tensor) -> float:
    """exp(mean next-token NLL); ``logits[..., t, :]`` must already predict ``target_ids[..., t]`` (no shift here)."""
    _check_logits("logits", logits)
    if not isinstance(target_ids, torch.Tensor) or target_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("target_ids must be an integer torch.Tensor (int32 or int64)")
    if target_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"target_ids shape {tuple(target_ids.shape)} must equal logits.shape[:-1], {tuple(logits.shape[:-1])}"
        )
    vocab = logits.shape[-1]
    if target_ids.numel() and not (0 <= int(target_ids.min()) and int(target_ids.max()) < vocab):
        raise ValueError(f"target_ids must lie in [0, {vocab}) (the logits' vocab size)")
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)  # (...,)
    return float(torch.exp(nll.mean()))
