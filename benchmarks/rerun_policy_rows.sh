#!/usr/bin/env bash
# Rerun policies on committed eval rows with the current code and replace their rows there (the old ones
# stay under previous_rows of results.json; several policies share one eval run and its prefills). Each row's task, protocol, length, samples, answer cap and
# budgets are read from its results.json, so the fresh run shares the committed samples.
# Usage: LABEL="why the rows changed" [POLICY=learned[,kvzap...]] [FRESH_ROOT=/tmp/rerun] bash benchmarks/rerun_policy_rows.sh ROW_DIR...
#   e.g. LABEL="controller deciding (LENGTH_REACH 2)" bash benchmarks/rerun_policy_rows.sh benchmarks/results/eval_range/ctx2048/*/
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LABEL:?set LABEL: the name under which the replaced rows are kept}"
policy="${POLICY:-learned}"
for dir in "$@"; do
  dir="${dir%/}"
  settings=$(python - "$dir" "$policy" <<'PY'
import json, sys
results = json.load(open(sys.argv[1] + "/results.json"))
names = sys.argv[2].split(",")
mine = [r for r in results["records"] if r["policy"] in names]
missing = sorted(set(names) - {r["policy"] for r in mine})
if missing:
    sys.exit(f"{sys.argv[1]}: no {missing} rows to rerun")
budgets = ",".join(str(b) for b in sorted({r["budget"] for r in mine}, reverse=True))
print(mine[0]["task"], results["protocol"], results["context_length"], results["samples_per_task"],
      results["max_new_tokens_cap"], results["seed"], budgets)
PY
)
  read -r task protocol context samples cap seed budgets <<< "$settings"
  fresh="${FRESH_ROOT:-/tmp/rerun}/$(basename "$(dirname "$dir")")/$(basename "$dir")"
  [ -f "$fresh/results.json" ] || adaptive-kv eval --policies "$policy" --budgets "$budgets" --tasks "$task" \
    --context-length "$context" --samples "$samples" --protocol "$protocol" --seed "$seed" \
    --max-new-tokens "$cap" --output "$fresh"
  for one in ${policy//,/ }; do
    python benchmarks/replace_policy_rows.py "$dir" "$fresh" --policy "$one" --label "$LABEL"
  done
done
