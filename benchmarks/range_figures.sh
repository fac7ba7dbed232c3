#!/usr/bin/env bash
# Held-out figures for the controller across lengths and budgets: SmolLM2-135M, seed 0 (never used in
# training), budgets 1/8 to 1/64, learned vs kvzip vs kvzap vs hybrid (the best static policy without
# reconstruction scores). Each task x protocol at one context length is one `adaptive-kv eval` run
# sharing every prefill; results land in benchmarks/results/eval_range/ctx<CONTEXT>/ (resumable:
# finished rows stay, a stopped row continues from its progress.json). A budget below what a policy
# can reach at that length is reported infeasible.
# Usage: bash benchmarks/range_figures.sh [SAMPLES] [CONTEXT] [PROTOCOLS] [TASKS...]
#   e.g. bash benchmarks/range_figures.sh 20 2048 query_agnostic niah_single passkey
# Environment: POLICIES, BUDGETS, MAX_NEW_TOKENS (the answer cap; generation stops earlier once an
# answer is found), OUT_ROOT.
set -euo pipefail
cd "$(dirname "$0")/.."
samples="${1:-20}"; shift || true
context="${1:-2048}"; shift || true
protocols="${1:-query_agnostic query_aware}"; shift || true
tasks=("${@:-passkey niah_single niah_multikey fidelity}")
policies="${POLICIES:-learned,kvzip,kvzap,hybrid}"
budgets="${BUDGETS:-0.125,0.0625,0.03125,0.015625}"
max_new_tokens="${MAX_NEW_TOKENS:-12}"
for task in ${tasks[@]}; do
  for protocol in $protocols; do
    [ "$task" = fidelity ] && [ "$protocol" = query_aware ] && continue  # no question: one protocol
    out="${OUT_ROOT:-benchmarks/results/eval_range}/ctx${context}/${task}_${protocol}"
    [ -f "$out/results.json" ] && continue
    adaptive-kv eval --policies "$policies" --budgets "$budgets" --tasks "$task" \
      --context-length "$context" --samples "$samples" --protocol "$protocol" --seed 0 --max-new-tokens "$max_new_tokens" \
      --output "$out" --resume
  done
done
