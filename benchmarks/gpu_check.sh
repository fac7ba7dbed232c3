#!/usr/bin/env bash
# GPU checks of the Triton backend, for a lent CUDA machine whose image holds torch and triton.
# In order of value, each part under its own time limit so one slow part cannot starve the rest:
#   1. tests/kernels/test_decode_host_work.py: one compressed decode step under a host-read guard, a launch
#      counter and torch.cuda.set_sync_debug_mode("error");
#   2. benchmarks/decode_speed.py: fused decode vs bf16 SDPA at 4k/32k/128k, batch 1 and 16;
#   3. the compiled kernels against their torch reference and every policy on CUDA against CPU
#      (tests/kernels/test_triton_kernels.py, tests/kernels/test_cuda.py).
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh      (TESTS=... picks part 3's files, BENCH=0 skips part 2)
# Wheels in .whl/ (e.g. the transformers version pyproject pins, with what it imports) are installed
# to /tmp/site first.
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
timeout "${HOST_WORK_S:-120}" python3 -m pytest tests/kernels/test_decode_host_work.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_host_work.log"
if [ "${BENCH:-1}" = 1 ]; then
  timeout "${BENCH_S:-330}" python3 "$root/benchmarks/decode_speed.py" --out "$OUT/decode_speed.json" 2>&1 | tee "$OUT/decode_speed.log"
fi
timeout "${TESTS_S:-300}" python3 -m pytest ${TESTS:-tests/kernels/test_triton_kernels.py tests/kernels/test_cuda.py} -q -p no:cacheprovider -x 2>&1 \
  | tee "$OUT/pytest_triton.log"
true
