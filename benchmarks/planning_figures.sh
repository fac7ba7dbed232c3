#!/usr/bin/env bash
# Bounded prefill vs end-of-prefill planning (issue 10): each policy's plan made after the whole
# prefill (`NAME`) and layer by layer as bounded prefill makes it (`NAME:planning=per_layer`), scored
# on the same prefills. SmolLM2-135M, context 1024, seed 0, budget 0.125, passkey (query-agnostic)
# and fidelity. Only policies bounded prefill can run (no reconstruction scores). Resumable;
# results in benchmarks/results/eval_planning/.
# Usage: bash benchmarks/planning_figures.sh [SAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
samples="${1:-10}"
specs=""
for p in snapkv tova ada_kv pyramidkv hybrid; do specs="$specs,$p,$p:planning=per_layer"; done
for task in passkey fidelity; do
  out="benchmarks/results/eval_planning/${task}_query_agnostic"
  [ -f "$out/results.json" ] && continue
  adaptive-kv eval --policies "${specs#,}" --budgets 0.125 --tasks "$task" --context-length 1024 \
    --samples "$samples" --protocol query_agnostic --seed 0 --max-new-tokens 12 --output "$out"
done
