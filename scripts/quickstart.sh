#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded defaults: `adaptive-kv quickstart` trains a
# controller briefly (local Ray, SQLite Optuna, local MLflow under ./mlruns), then compares the
# shipped and the new controller with the static policies on held-out samples, and prints the
# `mlflow ui` command. Pass a prompt as arguments to generate with the learned policy instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -gt 0 ]; then
  exec adaptive-kv generate --policy learned --budget 0.125 --max-new-tokens 48 "$@"
fi
exec adaptive-kv quickstart --output outputs/quickstart
