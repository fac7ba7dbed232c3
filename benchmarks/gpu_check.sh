#!/usr/bin/env bash
# GPU checks of the Triton backend, for a lent CUDA machine whose image holds torch and triton:
# the compiled kernels against their torch reference (tests/test_triton_kernels.py, which runs on
# CUDA when it is there), every policy end to end on CUDA against CPU (tests/test_cuda.py), then
# the kernel benchmark. Results and logs go to $OUT.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh      (TESTS=... to pick test files, BENCH=0 to skip the benchmark)
# Wheels in .whl/ (e.g. the transformers version pyproject pins) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# The package-dir mapping of pyproject (policies/, training/, services/ -> adaptive_kv.*) without an
# install: the image's Python may be newer than requires-python.
pkg=/tmp/adaptive_kv_pkg; rm -rf "$pkg"; mkdir -p "$pkg"
cp -r adaptive_kv tests pyproject.toml "$pkg/"
for sub in policies training services; do cp -r "$sub" "$pkg/adaptive_kv/$sub"; done
root="$PWD"; cd "$pkg"
export PYTHONPATH="$pkg:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest ${TESTS:-tests/test_triton_kernels.py tests/test_cuda.py} -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_triton.log"
[ "${BENCH:-1}" = 1 ] && python3 "$root/benchmarks/kernels.py" --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
true
