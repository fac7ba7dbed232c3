#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded defaults: generation with a compressed cache
# (keep 0.5 of the tokens per head, 4-bit) over a ~1k-token document, printing the KV report.
# Pass your own prompt as arguments to replace the document.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -gt 0 ]; then
  exec adaptive-kv generate --keep 0.5 --bits 4 --max-new-tokens 48 "$@"
fi
prompt="$(mktemp)"
trap 'rm -f "$prompt"' EXIT
# a long, real document ships with CPython itself: the language reference on exceptions
python -c "import pydoc_data.topics as t; print(t.topics['exceptions'] + t.topics['try'][:2500]); print('\nQuestion: in one sentence, what happens when an exception is not handled?')" > "$prompt"
adaptive-kv generate --keep 0.5 --bits 4 --max-new-tokens 48 --prompt-file "$prompt"
