"""What the exact reconstruction pass must cost, in arithmetic alone, over a plain prefill.

For each model shape and context length: floating-point operations of (plain prefill + the exact
pass of `adaptive_kv.reconstruction`) over those of the plain prefill, per decoder layer. Plain:
the context's projections and its causal attention. The pass, per chunk of q tokens (the repeat
prompt and up to `CHUNK_TOKENS` context tokens): their projections, their attention over the whole
context (logits and weighted values) and over their own tokens (causal), and every (query, context
token) logit once more for the max over queries (`fused max`: without that last term, what a kernel
taking the max inside the attention would cost). Norms, rotary embeddings and exponentials are left
out, so no implementation, however fast, measures below it (`scorer_prefill.py` times the real one).

The embedded model's shape is read from its config; others are given as
`name:hidden,intermediate,heads,kv_heads,head_dim` (e.g. the shapes a model card publishes).
Writes benchmarks/results/reconstruction_floor.{json,md}.

    python benchmarks/reconstruction_floor.py [--lengths 1024 2048 4096 8192 32768] [--shape NAME:H,I,A,KV,D ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from adaptive_kv import load_model
from adaptive_kv.reconstruction import CHUNK_TOKENS, ReconstructionRequest

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    """A decoder layer's shape: what its arithmetic depends on."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """`name:hidden,intermediate,heads,kv_heads,head_dim`."""
        name, _, numbers = text.partition(":")
        fields = numbers.split(",") if numbers else []
        values = [int(v) for v in fields if v.strip().isdigit()]
        if not name or len(fields) != 5 or len(values) != 5 or min(values) < 1:
            raise ValueError(f"--shape must be NAME:hidden,intermediate,heads,kv_heads,head_dim (positive), got {text!r}")
        return cls(name, *values)

    @classmethod
    def of_config(cls, name: str, config) -> "Shape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(name, config.hidden_size, config.intermediate_size, heads, config.num_key_value_heads, head_dim)

    @property
    def linear_per_token(self) -> int:
        """2 x multiply-adds of the projections (q, k, v, o) and the gated MLP for one token."""
        projections = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * (projections + 3 * self.hidden * self.intermediate)

    @property
    def attention_per_pair(self) -> int:
        """2 x multiply-adds of one (query, key) pair over all query heads: its logit and its weighted value."""
        return 4 * self.heads * self.head_dim


def floor(shape: Shape, request: ReconstructionRequest, fused_max: bool = False) -> float:
    """(plain prefill + exact pass) / plain prefill in floating-point operations, for `request`'s chunks."""
    causal_pairs = lambda n: n * (n + 1) // 2  # noqa: E731
    context = len(request.context_ids)
    plain = context * shape.linear_per_token + causal_pairs(context) * shape.attention_per_pair
    extra = 0
    for _, ids in request.chunks():
        queries = len(ids)
        extra += queries * shape.linear_per_token
        extra += (queries * context + causal_pairs(queries)) * shape.attention_per_pair
        if not fused_max:  # the logits again, without the weighted values: half a pair's work
            extra += queries * context * shape.attention_per_pair // 2
    return (plain + extra) / plain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 32768])
    parser.add_argument("--shape", action="append", default=[], help="NAME:hidden,intermediate,heads,kv_heads,head_dim")
    parser.add_argument("--output", default="reconstruction_floor")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.lengths):
        parser.error(f"--lengths must be >= 1, got {args.lengths}")
    try:
        others = [Shape.parse(text) for text in args.shape]
    except ValueError as error:
        parser.error(str(error))
    model, tokenizer = load_model("smollm2-135m")
    shapes = [Shape.of_config("smollm2-135m", model.config), *others]
    # the embedded tokenizer's repeat prompts for every shape: a few tokens either way move a floor by < 0.1 %
    requests = {n: ReconstructionRequest.for_prompt(tokenizer, [0] * n) for n in args.lengths}
    rows = [{"shape": s.name, "context": n, "floor_x": round(floor(s, requests[n]), 3),
             "fused_max_floor_x": round(floor(s, requests[n], fused_max=True), 3)} for s in shapes for n in args.lengths]
    command = shlex.join(["python", "benchmarks/reconstruction_floor.py", *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(
        {"command": command, "chunk_tokens": CHUNK_TOKENS, "shapes": [asdict(s) for s in shapes], "rows": rows}, indent=1))
    lines = [f"`{command}`: floating-point operations of a plain prefill plus the exact reconstruction pass over "
             f"those of the plain prefill (chunks of {CHUNK_TOKENS} context tokens); fused max: the same without "
             "recomputing the logits for the max over queries. Computed from the shapes, not timed: the least "
             "any implementation can measure.", "",
             "| shape (hidden, MLP, heads, KV heads, head dim) | " + " | ".join(str(n) for n in args.lengths) + " |",
             "|---" * (len(args.lengths) + 1) + "|"]
    for s in shapes:
        cells = [f"{r['floor_x']} ({r['fused_max_floor_x']})" for r in rows if r["shape"] == s.name]
        lines.append(f"| {s.name} ({s.hidden}, {s.intermediate}, {s.heads}, {s.kv_heads}, {s.head_dim}) | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: floor x (fused max floor x).")
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
