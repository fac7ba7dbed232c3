"""The `adaptive-kv` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from adaptive_kv.plan import ALLOWED_BITS


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _read_prompt(args: argparse.Namespace) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise CliError("give exactly one of PROMPT or --prompt-file")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise CliError(f"--prompt-file: no such file: {path}")
        return path.read_text()
    return args.prompt


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate with a uniform (keep, bits) plan and print the text and the KV report."""
    from adaptive_kv.generation import encode_prompt, generate
    from adaptive_kv.models import load_model
    from adaptive_kv.plan import Plan

    prompt = _read_prompt(args)
    model, tokenizer = load_model(args.model)
    ids = encode_prompt(tokenizer, prompt, chat=False if args.raw else None)
    config = model.config

    def uniform(stats) -> Plan:
        return Plan.uniform_fraction(
            config.num_hidden_layers, config.num_key_value_heads, stats.seq_len,
            keep_fraction=args.keep, key_bits=args.bits, sink_tokens=args.sinks, recent_window=args.window,
            group_size=args.group_size,
        )

    result = generate(model, tokenizer, ids, plan_provider=uniform, max_new_tokens=args.max_new_tokens)
    kv = result.kv
    if args.json:
        summary = {"full_bytes": kv["full_bytes"], "bytes": kv["bytes"], "ratio": kv["ratio"]}
        print(json.dumps({"text": result.text, "prompt_tokens": result.prompt_tokens, "kv": summary}))
        return 0
    print(result.text)
    print(
        f"\n[kv] prompt {result.prompt_tokens} tokens, keep {args.keep:g}, {args.bits}-bit: "
        f"full {_format_bytes(kv['full_bytes'])}, real {_format_bytes(kv['bytes'])}, "
        f"ratio {kv['ratio']:.2f}x smaller",
        file=sys.stderr if args.quiet_report else sys.stdout,
    )
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a compressed KV cache and report its bytes")
    p.add_argument("prompt", nargs="?", help="the prompt text (or use --prompt-file)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--keep", type=_fraction, default=0.5, help="fraction of tokens kept per head, in (0, 1]")
    p.add_argument("--bits", type=int, choices=ALLOWED_BITS, default=4, help="key and value bit-width")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens always kept in full precision")
    p.add_argument("--window", type=int, default=32, help="recent tokens kept in full precision")
    p.add_argument("--group-size", type=int, default=32, help="quantisation group size (power of two)")
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate")
    p.add_argument("--raw", action="store_true", help="feed the prompt as it is (no chat template)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet-report", action="store_true", help="print the KV report on stderr")
    p.set_defaults(func=cmd_generate)


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError("must be a comma-separated list")
    return items


def _budgets(text: str) -> tuple[float, ...]:
    return tuple(_fraction(x) for x in _csv(text))


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate policies x budgets on offline tasks, sharing each prefill; write the reports."""
    from tqdm import tqdm

    from adaptive_kv.evaluation import EvalConfig, Evaluator
    from adaptive_kv.models import load_model
    from adaptive_kv.report import mean_by_policy_budget, write_outputs

    config = EvalConfig(
        policies=args.policies, budgets=args.budgets, tasks=args.tasks, context_length=args.context_length,
        samples=args.samples, protocol=args.protocol, seed=args.seed, max_new_tokens=args.max_new_tokens,
    )
    from adaptive_kv.policies import available_policies

    # fail on bad names before the model loads (seconds) or anything is prefilled (minutes)
    config.validate(None, available_policies())
    model, tokenizer = load_model(args.model)
    bar = tqdm(total=0, desc="eval", unit="run", disable=args.json)
    evaluator = Evaluator(model, tokenizer, config, model_name=args.model, progress=lambda: bar.update(1))
    bar.total = len(evaluator.combos()) * config.samples * len(config.tasks)
    results = evaluator.run()
    bar.close()
    paths = write_outputs(results, Path(args.output))
    if args.mlflow:
        from adaptive_kv.training.tracking import log_eval

        log_eval(results, paths)
    if args.json:
        print(json.dumps(results))
        return 0
    _print_table(results, mean_by_policy_budget(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({results['wall_time_s']} s)")
    return 0


def _print_table(results: dict, means: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    tasks = sorted({r["task"] for r in results["records"]})
    cell = {(r["policy"], r["budget"], r["task"]): r["score"] for r in results["records"]}
    table = Table(title=f"{results['model']} ctx {results['context_length']} {results['protocol']}")
    for col in ("policy", "budget", *tasks, "mean", "bytes frac"):
        table.add_column(col, justify="right")
    for policy, budget in sorted({(p, b) for p, b, _ in cell}, key=lambda k: (-k[1], k[0])):
        m = means.get((policy, budget))
        scores = ["n/a" if cell.get((policy, budget, t)) is None else f"{cell[(policy, budget, t)]:.1f}" for t in tasks]
        tail = [f"{m['score']:.1f}", f"{m['bytes_fraction']:.4f}"] if m else ["infeasible", "-"]
        table.add_row(policy, f"{budget:g}", *scores, *tail)
    Console().print(table)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="compare policies x budgets on offline long-context tasks at equal bytes")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--policies", type=_csv, default=("snapkv", "kivi", "hybrid"), help="comma-separated policy names")
    p.add_argument("--budgets", type=_budgets, default=(0.5, 0.25, 0.125), help="comma-separated fractions in (0, 1]")
    p.add_argument("--tasks", type=_csv, default=("passkey", "niah_single"), help="comma-separated task names")
    p.add_argument("--context-length", type=_positive, default=1024, help="prompt tokens, exact")
    p.add_argument("--samples", type=_positive, default=5, help="samples per task")
    p.add_argument("--protocol", choices=("query_aware", "query_agnostic"), default="query_agnostic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="cap on each task's answer length")
    p.add_argument("--output", default="outputs/eval", help="folder for results.json, summary.md, pareto.png")
    p.add_argument("--mlflow", action="store_true", help="also log the run to MLflow (needs the training extra)")
    p.add_argument("--json", action="store_true", help="print results.json on stdout")
    p.set_defaults(func=cmd_eval)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    # the service's own module declares its flags; it imports FastAPI only when the command runs
    from adaptive_kv.services.cli import add_serve

    add_serve(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_generate, _add_eval, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="adaptive-kv", description="Hybrid, adaptive KV-cache compression")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adaptive-kv` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError) as exc:
        print(f"adaptive-kv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
