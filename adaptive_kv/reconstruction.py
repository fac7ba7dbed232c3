"""Context-reconstruction token scores (KVzip, Kim et al., NeurIPS 2025, arXiv:2505.23416).

A context token's score is the largest attention it receives, from any query and any query head
of its GQA group, while the model reads "Repeat the previous context exactly." followed by the
context again (teacher-forced). The question does not depend on the future query, so the scores
are query-agnostic: a token the model needs to reproduce its context is a token it may need later.

The pass runs right after the prefill forward, over that prefill's own keys and values, in chunks
of at most `chunk` context tokens (each chunk prompted with the end of the previous one, as the
paper does), through the model's decoder with no cache: the CompressedCache is left exactly as a
plain prefill leaves it, and at most one chunk's attention (split into query blocks) is held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
REPEAT_PART_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
CHUNK_TOKENS = 2048
OVERLAP_TOKENS = 8  # the tail of the previous chunk that prompts the next one
# queries per block of the max over queries: bounds memory to (H_q, 64, T + chunk) floats; 64 keeps a
# block's logits in cache and measured 7 % faster than 256 for the whole pass at 2k on CPU
QUERY_BLOCK = 64


@dataclass(frozen=True)
class ReconstructionRequest:
    """What the pass repeats: the context's token ids and the prompts' ids (no special tokens)."""

    context_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    part_prompt_ids: tuple[int, ...]
    chunk: int = CHUNK_TOKENS

    def __post_init__(self) -> None:
        if not self.context_ids or not self.prompt_ids:
            raise ValueError("context_ids and prompt_ids must be non-empty")
        if self.chunk < 16:
            raise ValueError(f"chunk must be >= 16 tokens, got {self.chunk}")

    @classmethod
    def for_prompt(cls, tokenizer, context_ids, chunk: int = CHUNK_TOKENS) -> "ReconstructionRequest":
        """The request for `context_ids`, with the repeat prompts tokenised by `tokenizer`."""
        encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        return cls(tuple(int(t) for t in context_ids), encode(REPEAT_PROMPT), encode(REPEAT_PART_PROMPT), chunk)

    def chunks(self) -> list[tuple[int, list[int]]]:
        """(first context position repeated, input ids) of every pass."""
        out = []
        for start in range(0, len(self.context_ids), self.chunk):
            body = list(self.context_ids[start : start + self.chunk])
            if start == 0:
                out.append((start, list(self.prompt_ids) + body))
            else:
                tail = list(self.context_ids[max(0, start - OVERLAP_TOKENS) : start])
                out.append((start, list(self.part_prompt_ids) + tail + body))
        return out


@dataclass
class ReconstructionPass:
    """State of one pass, handed to the attention function through the forward's kwargs."""

    keys: list[torch.Tensor]  # per layer (H_kv, T, D): the prefill's keys, read only
    values: list[torch.Tensor]
    scores: list[torch.Tensor | None] = field(default_factory=list)  # per layer (H_kv, T) fp32

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.keys)

    def attend(self, layer_idx: int, query: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention of the pass's queries (1, H_q, q, D) over context + own causal tokens: (1, q, H_q, D).

        Records, per context token, the max probability over queries and the GQA group's heads. On CPU
        the output comes from the fused flash attention, which also returns each query's log-sum-exp,
        so a context token's largest probability is exp(max over queries of logit - lse): no softmax is
        materialised and the own tokens' logits are never formed (`attend_reference` does it all in
        plain torch, and serves every other device).
        """
        if query.device.type != "cpu":
            return self.attend_reference(layer_idx, query, key_states, value_states, scaling)
        ctx_k, ctx_v = self.keys[layer_idx], self.values[layer_idx]  # (H_kv, T, D)
        num_kv, seq_len, head_dim = ctx_k.shape
        q = query[0]  # (H_q, q, D)
        group, q_len = q.shape[0] // num_kv, q.shape[1]
        # two fused calls, merged by their log-sum-exps: the context (every query sees every token, no
        # mask) and the pass's own tokens (causal, so the flash kernel skips the blocks above the diagonal)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        expand = lambda t: t.repeat_interleave(group, 0)[None]  # noqa: E731  (GQA: the op wants H_q heads)
        out_ctx, lse_ctx = flash(query, expand(ctx_k), expand(ctx_v), scale=scaling)
        out_own, lse_own = flash(query, expand(key_states[0]), expand(value_states[0]), is_causal=True, scale=scaling)
        lse = torch.logaddexp(lse_ctx, lse_own)
        out = out_ctx * (lse_ctx - lse).exp()[..., None] + out_own * (lse_own - lse).exp()[..., None]
        lse = lse[0].float().reshape(num_kv, group * q_len, 1)  # (H_kv, G*q, 1): GQA heads of a KV head side by side
        grouped = q.float().reshape(num_kv, group * q_len, head_dim)
        ctx_t = ctx_k.float().transpose(1, 2)
        best = torch.full((num_kv, seq_len), float("-inf"), device=q.device)
        for start in range(0, group * q_len, QUERY_BLOCK * group):
            rows = slice(start, start + QUERY_BLOCK * group)
            logits = torch.baddbmm(-lse[:, rows], grouped[:, rows], ctx_t, alpha=scaling)  # (H_kv, b, T): log probs
            best = torch.maximum(best, logits.amax(1))
        self._record(layer_idx, best.exp())
        return out.transpose(1, 2)

    def _record(self, layer_idx: int, best: torch.Tensor) -> None:
        previous = self.scores[layer_idx]
        self.scores[layer_idx] = best if previous is None else torch.maximum(previous, best)

    def attend_reference(self, layer_idx: int, query: torch.Tensor, key_states: torch.Tensor,
                         value_states: torch.Tensor, scaling: float) -> torch.Tensor:
        """`attend` in plain torch: fp32 softmax over context + own tokens, per block of queries."""
        ctx_k, ctx_v = self.keys[layer_idx], self.values[layer_idx]  # (H_kv, T, D)
        num_kv, seq_len, head_dim = ctx_k.shape
        q = query[0]  # (H_q, q, D)
        group = q.shape[0] // num_kv
        keys = torch.cat([ctx_k, key_states[0]], dim=1).float()  # (H_kv, T + q, D)
        values = torch.cat([ctx_v, value_states[0]], dim=1).float()
        q_len = q.shape[1]
        out = torch.empty(q.shape[0], q_len, head_dim, dtype=torch.float32, device=q.device)
        best = torch.zeros(num_kv, seq_len, dtype=torch.float32, device=q.device)
        for start in range(0, q_len, QUERY_BLOCK):
            rows = torch.arange(start, min(q_len, start + QUERY_BLOCK), device=q.device)
            block = q[:, rows].float().view(num_kv, group * rows.numel(), head_dim)  # (H_kv, G*b, D)
            logits = block @ keys.transpose(1, 2) * scaling  # (H_kv, G*b, T + q)
            own = torch.arange(q_len, device=q.device)
            future = own[None, :] > rows[:, None]  # causal within the pass's own tokens
            logits[..., seq_len:] = logits[..., seq_len:].masked_fill(future.repeat(group, 1), float("-inf"))
            probs = logits.softmax(-1)
            best = torch.maximum(best, probs[..., :seq_len].amax(1))
            out[:, rows] = (probs @ values).view(q.shape[0], rows.numel(), head_dim)
        self._record(layer_idx, best)
        return out.to(query.dtype).transpose(0, 1).unsqueeze(0)


@torch.inference_mode()
def reconstruction_scores(model, keys: list[torch.Tensor], values: list[torch.Tensor],
                          request: ReconstructionRequest, seq_len: int | None = None) -> torch.Tensor:
    """Scores (L, H_kv, T) of the context whose prefill keys/values (per layer (H_kv, T, D)) are given.

    `seq_len` is the prefill's length (default: the longest layer's); a sliding-window layer gives
    only the newest tokens it holds, and its scores are zero before them.
    """
    seq_len = max(k.shape[1] for k in keys) if seq_len is None else seq_len
    if len(request.context_ids) != seq_len:
        raise ValueError(
            f"reconstruction context_ids has {len(request.context_ids)} tokens, the prefill has {seq_len}"
        )
    state = ReconstructionPass(keys, values)
    decoder = model.get_decoder()
    device = keys[0].device
    for _, ids in request.chunks():
        input_ids = torch.tensor([ids], device=device)
        positions = torch.arange(seq_len, seq_len + len(ids), device=device).unsqueeze(0)
        decoder(input_ids=input_ids, position_ids=positions, use_cache=False, kv_reconstruction=state)
    return torch.stack([F.pad(layer, (seq_len - layer.shape[-1], 0)) for layer in state.scores])
