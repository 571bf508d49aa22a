#!/usr/bin/env bash
# One CI leg on another torch stack: a cached venv with the CUDA build of torch==VERSION from the
# package registry, rmi_ext built against it with FORCE_CUDA=1 for sm_80 and sm_90 (no GPU needed),
# then: import, backend_info("cuda"), the CPU test suite (CPU kernels of a CUDA build against the
# reference; the Triton sm_90 compile test with that torch's triton).
#
#   bash .ci/stack.sh NAME TORCH_VERSION [pytest arguments, default: tests]
#
# Without nvcc (a user's CPU machine) it says so and exits 0; under CI=true a missing nvcc fails.
# The venv and the wheels are kept in $RMI_EXT_CI_CACHE (default ~/.cache/rmi_ext_ci).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 version=$2
shift 2
cache=${RMI_EXT_CI_CACHE:-$HOME/.cache/rmi_ext_ci}
venv=$cache/venv-$name
log() { printf '[stack %s] %s\n' "$name" "$*"; }

if ! command -v nvcc > /dev/null; then
  if [[ "${CI:-}" == "true" ]]; then log "nvcc not found: CI must build the CUDA sources"; exit 1; fi
  log "skipped: no nvcc on this machine (the CUDA build needs a CUDA toolkit)"
  exit 0
fi
# nvcc on PATH may be a wrapper script; the toolkit is nvcc's own TOP folder.
cuda_home=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
cuda_home=$(cd "$cuda_home" && pwd)

# The registry's default torch wheel is the CUDA build; the local wheel folder and the pip
# configuration of this machine would hand out the CPU build instead, so both are bypassed.
registry_pip() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$@"; }
if [[ ! -f "$venv/.ready-$version" ]]; then
  log "creating $venv with torch==$version (CUDA build)"
  rm -rf "$venv"
  mkdir -p "$cache/wheels"
  if [[ ! -f "$cache/wheels/.torch-$version" ]]; then
    registry_pip python -m pip download -q "torch==$version" -d "$cache/wheels"
    touch "$cache/wheels/.torch-$version"
  fi
  python -m venv "$venv"
  registry_pip "$venv/bin/pip" install -q --no-index --find-links "$cache/wheels" "torch==$version"
  touch "$venv/.ready-$version"
fi
# The rest of the dev requirements on every run: a cached venv gets what was added since.
grep -v -E '^(torch|triton)\b' requirements-dev.txt > "$venv/requirements-rest.txt"
"$venv/bin/pip" install -q -r "$venv/requirements-rest.txt"
py=$venv/bin/python
"$py" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__)'

# Build outside the work tree so this build and the main one never share build/ folders.
src=$venv/src
rm -rf "$src" && mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done \
  | xargs -0 cp --parents -t "$src"
log "building for sm_80 and sm_90 with CUDA_HOME=$cuda_home"
(cd "$src" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" CUDA_HOME=$cuda_home MAX_JOBS=2 \
  "$venv/bin/pip" install -q --no-build-isolation --no-deps .)

# Load the installed library (a C++ signature mismatch between the CPU and CUDA kernels aborts
# here), from outside the work tree so that the installed rmi_ext is the one imported.
(cd "$venv" && "$py" -) <<'EOF'
import torch
import rmi_ext
import rmi_ext._ops  # loads rmi_ext._C: the schemas and the CPU and CUDA kernels
for key in ("CPU", "CUDA"):
    for op in ("forward_stats", "backward_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rmi_ext::{op}", key), (op, key)
print("backend_info('cuda'):", rmi_ext.backend_info("cuda"))
print("backend_info('cpu'):", rmi_ext.backend_info("cpu"))
x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
y = torch.randint(0, 3, (2, 17, 19))
a, b = rmi_ext.rmi_loss(x, y, backend="cpu"), rmi_ext.rmi_loss(x, y, backend="reference")
assert torch.allclose(a, b, rtol=1e-10, atol=0), (a, b)
print("CPU kernels of the CUDA build match the reference:", a.item())
EOF

log "pytest ${*:-tests}"
RMI_EXT_REQUIRE_CPP=1 RMI_EXT_REQUIRE_CUDA_BUILD=1 "$venv/bin/pytest" -q -p no:cacheprovider "${@:-tests}"
