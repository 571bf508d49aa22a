#!/usr/bin/env bash
# The one-call GPU check, for a fresh GPU machine where torch, triton, nvcc and pytest are
# installed and nothing can be fetched (about 5 minutes on one H200):
#   1. builds rmi_ext for the card's arch (pip, no build isolation, no downloads);
#   2. runs the GPU tests: the CUDA and Triton backends against the reference (float32, float64,
#      fp16/bf16, every pool mode, DF 1, layouts, opcheck) and the training tests;
#   3. runs benchmarks/gpu_check.py: [16, 21, 513, 513] DF 4 R 3 and [8, 21, 513, 513] DF 1 R 3
#      for the reference, triton and cuda (time, peak memory, bytes/s against a copy), no host
#      sync, autocast and torch.compile; writes OUTDIR/gpu_check.md and OUTDIR/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry OUTDIR    # on a CPU: tiny shapes, Triton interpreted (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ "${1:-}" == "--dry" ]]; then dry=1; shift; fi
out=${1:?usage: bash benchmarks/gpu_check.sh [--dry] OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
log() { printf '[gpu_check %4ds] %s\n' "$SECONDS" "$*"; }

if [[ $dry == 0 ]]; then
  arch=$("$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"
print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST=$arch
  log "building for sm_${arch/./} ($("$py" -c 'import torch; print(torch.cuda.get_device_name())'))"
else
  log "dry run: CPU build"
fi
MAX_JOBS=$(nproc) "$py" -m pip install -q --no-build-isolation --no-deps --no-index . \
  > "$out/build.log" 2>&1 || { tail -n 40 "$out/build.log"; exit 1; }

status=0
if [[ $dry == 0 ]]; then
  log "GPU tests"
  # RMI_TEST_SKIP_NVCC: the torch-free nvcc compile check and emulation need no GPU (CI runs
  # them); the device's minutes go to the compiled kernels.
  (cd tests && RMI_TEST_SKIP_NVCC=1 "$py" -m pytest -q -p no:cacheprovider -x --full \
      --junitxml="$out/tests.xml" \
      test_cuda.py test_triton.py test_training.py test_targets.py test_build.py) 2>&1 \
    | tee "$out/tests.log" \
    | tail -n 5 || status=1
else
  log "dry run: build test only (CI runs the whole suite separately)"
  (cd tests && RMI_EXT_REQUIRE_CPP=1 "$py" -m pytest -q -p no:cacheprovider test_build.py) \
    2>&1 | tee "$out/tests.log" | tail -n 2 || status=1
fi

log "measurements"
flags=(--out "$out")
if [[ $dry == 1 ]]; then flags+=(--dry); fi
(cd benchmarks && "$py" gpu_check.py "${flags[@]}") \
  2>&1 | grep -v '^USDT' || status=1
log "done: $out/gpu_check.md (status $status)"
exit $status
