#!/usr/bin/env bash
# Held-out figures for the learned controller (issues 7, 9, 12): SmolLM2-135M, context 1024, seed 0
# (never used in training), both protocols. Each task x protocol is one `adaptive-kv eval` run that
# shares every prefill across all policies and budgets; results land in benchmarks/results/eval_learned/.
# Usage: bash benchmarks/controller_figures.sh [SAMPLES] [TASKS...]
#        RERUN=learned bash benchmarks/controller_figures.sh 10   (a retrained controller: only its rows
#        are re-evaluated, on the same samples, and replace the committed ones; the old rows stay in
#        results.json under previous_rows)
#        OUT_ROOT=outputs/figs bash benchmarks/controller_figures.sh 10   (every policy, into another folder)
# `learned` reads predicted reconstruction scores by default; the committed rows read exact ones:
# POLICY_LEARNED=learned:reconstruction=exact reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
samples="${1:-10}"; shift || true
tasks=("${@:-passkey fidelity niah_single niah_multikey variable_tracking}")
policies="${POLICY_LEARNED:-learned},kvzip,hybrid,kivi,knorm,tova,ada_kv,snapkv"
shared="tova:selection=shared,snapkv:selection=shared,knorm:selection=shared,h2o,h2o:selection=shared"
for task in ${tasks[@]}; do
  for protocol in query_agnostic query_aware; do
    [ "$task" = fidelity ] && [ "$protocol" = query_aware ] && continue  # no question: one protocol
    extra=""
    [ "$task" = passkey ] && extra=",$shared"  # per-head vs shared selection, side by side
    out="${OUT_ROOT:-benchmarks/results/eval_learned}/${task}_${protocol}"
    if [ -n "${RERUN:-}" ]; then
      fresh="${RERUN_DIR:-outputs/rerun_${RERUN}}/${task}_${protocol}"
      [ -f "$fresh/results.json" ] || adaptive-kv eval --policies "$RERUN" --budgets 0.25,0.125,0.0625 --tasks "$task" \
        --context-length 1024 --samples "$samples" --protocol "$protocol" --seed 0 --max-new-tokens 12 --output "$fresh"
      python benchmarks/replace_policy_rows.py "$out" "$fresh" --policy "$RERUN" --label "${RERUN_LABEL:-before}"
      continue
    fi
    [ -f "$out/results.json" ] && continue  # resumable: finished runs stay
    adaptive-kv eval --policies "$policies$extra" --budgets 0.25,0.125,0.0625 --tasks "$task" \
      --context-length 1024 --samples "$samples" --protocol "$protocol" --seed 0 --max-new-tokens 12 --output "$out"
  done
done
