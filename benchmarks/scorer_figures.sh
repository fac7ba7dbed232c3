#!/usr/bin/env bash
# Held-out figures for the reconstruction predictor: SmolLM2-135M, context 1024, seed 0 (never used in
# training), 20 samples per row, both protocols. Learned on predicted scores vs learned on exact ones
# vs kvzip vs kvzap vs hybrid (the best static policy without reconstruction in eval_learned). Each
# task x protocol is one `adaptive-kv eval` run sharing every prefill; results land in
# benchmarks/results/eval_scorer/ (resumable: finished rows stay).
# Usage: bash benchmarks/scorer_figures.sh [SAMPLES] [CONTEXT] [TASKS...]
set -euo pipefail
cd "$(dirname "$0")/.."
samples="${1:-20}"; shift || true
context="${1:-1024}"; shift || true
tasks=("${@:-passkey niah_single niah_multikey fidelity}")
policies="learned:reconstruction=predicted,learned:reconstruction=exact,kvzip,kvzap,hybrid"
for task in ${tasks[@]}; do
  for protocol in query_agnostic query_aware; do
    [ "$task" = fidelity ] && [ "$protocol" = query_aware ] && continue  # no question: one protocol
    out="${OUT_ROOT:-benchmarks/results/eval_scorer}/ctx${context}/${task}_${protocol}"
    [ -f "$out/results.json" ] && continue
    adaptive-kv eval --policies "$policies" --budgets 0.25,0.125,0.0625 --tasks "$task" \
      --context-length "$context" --samples "$samples" --protocol "$protocol" --seed 0 --max-new-tokens 12 \
      --output "$out"
  done
done
