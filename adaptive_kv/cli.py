"""The `adaptive-kv` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from adaptive_kv import cli_args
from adaptive_kv.plan import ALLOWED_BITS


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


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
    policy = _policy(args) if args.policy else None
    model, tokenizer = load_model(args.model)
    ids = encode_prompt(tokenizer, prompt, chat=False if args.raw else None)
    config = model.config

    def uniform(stats) -> Plan:
        return Plan.uniform_fraction(
            config.num_hidden_layers, config.num_key_value_heads, stats.seq_len,
            keep_fraction=args.keep, key_bits=args.bits, sink_tokens=args.sinks, recent_window=args.window,
            group_size=args.group_size,
        ).fitted_to(stats.windows, stats.seq_len)

    options = {}
    provider = uniform
    if policy is not None:
        provider, options = _provider(policy, args.budget), {"stats_config": policy.stats_config()}
    result = generate(model, tokenizer, ids, plan_provider=provider, max_new_tokens=args.max_new_tokens, **options)
    kv = result.kv
    # e.g. `learned` outside its trained range, or scores predicted far from the scorer's lengths
    note = (kv.get("plan") or {}).get("note")
    if args.json:
        summary = {"full_bytes": kv["full_bytes"], "bytes": kv["bytes"], "ratio": kv["ratio"],
                   **({"note": note} if note else {})}
        print(json.dumps({"text": result.text, "prompt_tokens": result.prompt_tokens, "kv": summary}))
        return 0
    print(result.text)
    what = f"policy {args.policy} at budget {args.budget:g}" if policy is not None else f"keep {args.keep:g}, {args.bits}-bit"
    report = sys.stderr if args.quiet_report else sys.stdout
    print(
        f"\n[kv] prompt {result.prompt_tokens} tokens, {what}: "
        f"full {_format_bytes(kv['full_bytes'])}, real {_format_bytes(kv['bytes'])}, "
        f"ratio {kv['ratio']:.2f}x smaller",
        file=report,
    )
    if note:
        print(f"[kv] note: {note}", file=report)
    return 0


CONTROLLER_URIS = ("models:/", "runs:/")


def _policy(args: argparse.Namespace):
    """The policy named by --policy: a registered name (with --controller for `learned`), or a trained
    controller itself, as a folder or an MLflow model URI (models:/NAME@champion, fetched from
    $MLFLOW_TRACKING_URI or ./mlruns)."""
    from adaptive_kv.policies import get_policy

    controller = getattr(args, "controller", None)
    if args.policy.startswith(CONTROLLER_URIS) or Path(args.policy, "controller.json").is_file():
        if controller:
            raise CliError(f"--policy {args.policy} is a controller already; --controller applies to --policy learned")
        return get_policy("learned", path=str(_fetch_controller(args.policy)))
    options = {"path": controller} if controller else {}
    if options and args.policy != "learned":
        raise CliError("--controller applies to --policy learned only")
    return get_policy(args.policy, **options)


def _fetch_controller(source: str) -> Path:
    """A local folder of the controller at `source` (a folder, or a registry URI, downloaded once)."""
    from adaptive_kv.policies.controller.registry import fetch_controller

    try:
        return fetch_controller(source)
    except ImportError as exc:  # mlflow (the train or serve extra) is missing
        raise CliError(f"--policy {source} needs mlflow to fetch a registered controller: {exc}") from exc


def _provider(policy, budget: float):
    """AttentionStats -> Plan for `policy` at `budget`."""
    return lambda stats: policy.plan(stats, budget)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a compressed KV cache and report its bytes")
    p.add_argument("prompt", nargs="?", help="the prompt text (or use --prompt-file)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--keep", type=cli_args.fraction, default=0.5, help="fraction of tokens kept per head, in (0, 1]")
    p.add_argument("--bits", type=int, choices=ALLOWED_BITS, default=4, help="key and value bit-width")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens always kept in full precision")
    p.add_argument("--window", type=int, default=32, help="recent tokens kept in full precision")
    p.add_argument("--group-size", type=int, default=32, help="quantisation group size (power of two)")
    p.add_argument("--max-new-tokens", type=cli_args.positive, default=64, help="tokens to generate")
    p.add_argument("--policy", help="decide per request with this policy (e.g. learned, kvzip, hybrid), a controller folder "
                                    "or models:/NAME@champion, instead of --keep/--bits")
    p.add_argument("--budget", type=cli_args.fraction, default=0.125, help="with --policy: KV bytes as a fraction of full precision")
    p.add_argument("--controller", help="with --policy learned: a controller folder (default: the shipped one)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as it is (no chat template)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet-report", action="store_true", help="print the KV report on stderr")
    p.set_defaults(func=cmd_generate)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate policies x budgets on offline tasks, sharing each prefill; write the reports."""
    from tqdm import tqdm

    from adaptive_kv.eval_progress import PROGRESS_FILE, read_progress
    from adaptive_kv.evaluation import EvalConfig, Evaluator, build_policies, run_identity
    from adaptive_kv.models import load_model
    from adaptive_kv.report import mean_by_policy_budget, write_outputs

    config = EvalConfig(
        policies=args.policies, budgets=args.budgets, tasks=args.tasks, context_length=args.context_length,
        samples=args.samples, protocol=args.protocol, seed=args.seed, max_new_tokens=args.max_new_tokens,
    )
    from adaptive_kv import policies as catalog

    # fail on bad names before the model loads (seconds) or anything is prefilled (minutes)
    config.validate(None, catalog.available_policies())
    progress = Path(args.output) / PROGRESS_FILE
    if args.resume and progress.exists():
        read_progress(progress, run_identity(args.model, config, build_policies(config, catalog)[0]), config.samples)
    model, tokenizer = load_model(args.model)
    bar = tqdm(total=0, desc="eval", unit="run", disable=args.json)
    evaluator = Evaluator(model, tokenizer, config, catalog=catalog, model_name=args.model,
                          progress=lambda: bar.update(1))
    bar.total = len(evaluator.combos()) * config.samples * len(config.tasks)
    results = evaluator.run(progress, resume=args.resume)
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

    from adaptive_kv.report import plan_notes

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
    for line in plan_notes(results):
        print(f"note: {line}")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="compare policies x budgets on offline long-context tasks at equal bytes")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--policies", type=cli_args.csv, default=("snapkv", "kivi", "hybrid"), help="comma-separated policy names")
    p.add_argument("--budgets", type=cli_args.budgets, default=(0.5, 0.25, 0.125), help="comma-separated fractions in (0, 1]")
    p.add_argument("--tasks", type=cli_args.csv, default=("passkey", "niah_single"), help="comma-separated task names")
    p.add_argument("--context-length", type=cli_args.positive, default=1024, help="prompt tokens, exact")
    p.add_argument("--samples", type=cli_args.positive, default=5, help="samples per task")
    p.add_argument("--protocol", choices=("query_aware", "query_agnostic"), default="query_agnostic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=cli_args.positive, default=None, help="cap on each task's answer length")
    p.add_argument("--output", default="outputs/eval",
                   help="folder for results.json, summary.md, pareto.png and progress.json (the state after each sample)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/progress.json: its samples are kept (same settings; --samples may grow)")
    p.add_argument("--mlflow", action="store_true", help="also log the run to MLflow (needs the training extra)")
    p.add_argument("--json", action="store_true", help="print results.json on stdout")
    p.set_defaults(func=cmd_eval)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    # the service's own module declares its flags; it imports FastAPI only when the command runs
    from adaptive_kv.services.cli import add_serve

    add_serve(sub)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print (and optionally draw) the plan a policy chooses for a prompt."""
    from adaptive_kv.generation import encode_prompt
    from adaptive_kv.models import load_model
    from adaptive_kv.prefill import capture, needs_of

    prompt = _read_prompt(args)
    policy = _policy(args)
    model, tokenizer = load_model(args.model)
    ids = encode_prompt(tokenizer, prompt, chat=False if args.raw else None)
    stats = capture(model, tokenizer, ids, needs_of([policy])).cache.stats
    plan = policy.plan(stats, args.budget)
    seq_len, head_dim, itemsize = len(ids), stats.head_dim, stats.dtype_bytes
    fraction = plan.nbytes(seq_len, head_dim, itemsize) / plan.full_nbytes(seq_len, head_dim, itemsize)
    if args.png:
        from adaptive_kv.training.plots import plan_heatmap_png

        plan_heatmap_png({args.policy: plan}, seq_len, Path(args.png), f"{args.policy} at budget {args.budget:g}, {seq_len} tokens")
    if args.json:
        print(json.dumps({"policy": args.policy, "budget": args.budget, "seq_len": seq_len,
                          "bytes_fraction": fraction, "plan": plan.to_dict()}))
        return 0
    _print_plan(plan, args.policy, args.budget, seq_len, fraction)
    return 0


def _print_plan(plan, policy: str, budget: float, seq_len: int, fraction: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{policy} at budget {budget:g}: {seq_len} tokens, {fraction:.4f} of full bytes")
    table.add_column("layer", justify="right")
    for h in range(plan.num_kv_heads):
        table.add_column(f"head {h}: keep / K / V", justify="right")
    for layer_idx, layer in enumerate(plan.heads):
        cells = [f"{'all' if b.keep is None else b.keep} / {b.key_bits} / {b.value_bits}" for b in layer]
        table.add_row(str(layer_idx), *cells)
    Console().print(table)
    if plan.note:
        print(f"note: {plan.note}")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show the plan a policy chooses for a prompt (table, JSON, heat-map)")
    p.add_argument("prompt", nargs="?", help="the prompt text (or use --prompt-file)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m) or local HF folder")
    p.add_argument("--policy", default="learned", help="policy name (default: learned), a controller folder or "
                                                       "models:/NAME@champion")
    p.add_argument("--controller", help="with --policy learned: a controller folder (default: the shipped one)")
    p.add_argument("--budget", type=cli_args.fraction, default=0.125, help="KV bytes as a fraction of full precision")
    p.add_argument("--raw", action="store_true", help="feed the prompt as it is (no chat template)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", help="also draw the plan as a heat-map into this PNG file")
    p.set_defaults(func=cmd_plan)


def _add_train(sub: argparse._SubParsersAction) -> None:
    # flags live with the training package; it imports ray/optuna/mlflow only when the command runs
    from adaptive_kv.training.cli import add_train

    add_train(sub)


def _add_train_scorer(sub: argparse._SubParsersAction) -> None:
    from adaptive_kv.training.cli import add_train_scorer

    add_train_scorer(sub)


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    from adaptive_kv.training.cli import add_quickstart

    add_quickstart(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_generate, _add_plan, _add_eval, _add_train, _add_train_scorer, _add_serve, _add_quickstart,
]


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
