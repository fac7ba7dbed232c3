"""Replace one policy's rows of committed eval results with a fresh run on the same samples.

After retraining the controller, only `learned` needs re-evaluating: the static policies' rows
stay valid because the samples (task, seed, context length, protocol) are the same. The fresh
run must have been made with identical settings (checked), and its reference rows must agree
with the committed ones (checked: the same prefills and answers). The replaced rows are kept in
`previous_rows` of results.json, so the before/after stays visible.

    python benchmarks/replace_policy_rows.py COMMITTED_DIR FRESH_DIR [--policy learned | '*'] [--label TEXT]

`--policy '*'` replaces every policy's rows (after a change to the cache itself).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaptive_kv.report import write_outputs

ALL = "*"
SAME = ("model", "context_length", "protocol", "seed", "samples_per_task", "max_new_tokens_cap")


def replace_rows(committed: dict, fresh: dict, policy: str, label: str) -> dict:
    """`committed` with `policy`'s records taken from `fresh`; the old ones under previous_rows[label]."""
    for key in SAME:
        if committed.get(key) != fresh.get(key):
            raise ValueError(f"{key} differs: committed {committed.get(key)!r}, fresh {fresh.get(key)!r}")
    full = lambda res: {(r["budget"], r["task"]): r["score"] for r in res["records"] if r["policy"] == "full"}  # noqa: E731
    if full(committed) != full(fresh):
        raise ValueError("the full cache scores differ: not the same samples or model")
    # "*": every policy's rows (the cache changed, not one policy); the full cache's rows stay
    mine = (lambda r: r["policy"] != "full") if policy == ALL else (lambda r: r["policy"] == policy)  # noqa: E731
    new_rows = [r for r in fresh["records"] if mine(r)]
    if not new_rows:
        raise ValueError(f"the fresh run has no {policy!r} rows")
    out = dict(committed)
    kept = committed.get("previous_rows", {})  # one label may cover several policies' replacements
    out["previous_rows"] = {**kept, label: kept.get(label, []) + [r for r in committed["records"] if mine(r)]}
    out["records"] = [r for r in committed["records"] if not mine(r)] + new_rows
    out.setdefault("reruns", []).append({"policy": policy, "label": label, "wall_time_s": fresh["wall_time_s"]})
    return out


def main() -> None:
    """CLI entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("committed", type=Path)
    parser.add_argument("fresh", type=Path)
    parser.add_argument("--policy", default="learned", help="the policy whose rows are replaced, or '*' for all")
    parser.add_argument("--label", default="before", help="name under which the replaced rows are kept")
    args = parser.parse_args()
    committed = json.loads((args.committed / "results.json").read_text())
    fresh = json.loads((args.fresh / "results.json").read_text())
    write_outputs(replace_rows(committed, fresh, args.policy, args.label), args.committed)
    print(f"replaced {args.policy} rows in {args.committed}")


if __name__ == "__main__":
    main()
