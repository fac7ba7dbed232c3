#!/usr/bin/env bash
# Refresh constraints.txt, the lock scripts/venv.sh installs with: build a throwaway venv with the
# lock lifted (every range in pyproject.toml resolved anew, as a fresh clone would without a lock),
# then freeze it. Run it on purpose, when newer dependencies are wanted; then run the tests
# (bash scripts/test.sh rebuilds .venv, since the lock's hash changed) and commit constraints.txt
# with what they showed. Takes a few minutes and downloads what pip does not have cached.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ADAPTIVE_KV_VENV="$tmp/venv" ADAPTIVE_KV_CONSTRAINTS=/dev/null bash "$root/scripts/venv.sh"
{
  echo "# Versions CI tested, installed by scripts/venv.sh (pip install -c constraints.txt ...)."
  echo "# Refreshed on purpose by scripts/lock.sh (a fresh resolve of pyproject.toml), not by hand."
  # --all pins pip and setuptools too; the project itself is no dependency. torch's local label
  # (+cpu) is dropped: torch==2.13.0 is what pyproject.toml asks for, and matches the CPU build.
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable --exclude adaptive-kv \
    | sed -E 's/^torch==([^+]+)\+.*/torch==\1/'
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" "$root/constraints.txt"
echo "wrote $root/constraints.txt ($(grep -vc '^#' "$root/constraints.txt") pins)"
