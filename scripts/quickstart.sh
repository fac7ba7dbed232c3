#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded defaults: generation with a compressed cache.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec adaptive-kv generate --keep 0.5 --bits 4 --max-new-tokens 48 \
  "${@:-Explain in three sentences why the KV cache of a transformer grows with the context length.}"
