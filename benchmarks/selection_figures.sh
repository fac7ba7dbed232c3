#!/usr/bin/env bash
# Per-head vs shared token selection for every static policy (issue 9): SmolLM2-135M, context 1024,
# seed 0, budgets 0.5 / 0.25 / 0.125 / 0.0625, both protocols. `NAME` rows are each policy's default
# (shared for the eviction policies, per-head for kvzip); `NAME:selection=...` the other choice.
# One `adaptive-kv eval` per task x protocol (every prefill shared by all rows); resumable: finished
# runs are skipped. Results land in benchmarks/results/eval_selection/.
# Usage: bash benchmarks/selection_figures.sh [TASK:SAMPLES ...]   (default: the issue's set)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=("${@:-fidelity:20 niah_single:10 passkey:20}")
other="tova:selection=per_head,snapkv:selection=per_head,knorm:selection=per_head,h2o:selection=per_head"
other="$other,ada_kv:selection=per_head,pyramidkv:selection=per_head,hybrid:selection=per_head,kvzip:selection=shared"
policies="kivi,streaming_llm,tova,snapkv,knorm,h2o,ada_kv,pyramidkv,hybrid,kvzip,$other"
for run in ${runs[@]}; do
  task="${run%%:*}"; samples="${run##*:}"
  for protocol in query_agnostic query_aware; do
    [ "$task" = fidelity ] && [ "$protocol" = query_aware ] && continue  # no question: one protocol
    out="benchmarks/results/eval_selection/${task}_${protocol}"
    [ -f "$out/results.json" ] && continue
    adaptive-kv eval --policies "$policies" --budgets 0.5,0.25,0.125,0.0625 --tasks "$task" \
      --context-length 1024 --samples "$samples" --protocol "$protocol" --seed 0 --max-new-tokens 12 --output "$out"
  done
done
