#!/usr/bin/env bash
# Set up .venv and run the whole test suite (tiny models + the embedded model; CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest "$@"
