#!/usr/bin/env bash
# `pip install .` as a user runs it, with the newest pip, in a fresh venv:
#  1. no torch installed: the build stops with the one-line message of setup.py;
#  2. torch installed first: the build uses that torch (no second torch is downloaded) and the
#     installed package runs its C++ kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/rmi_pip_install.XXXXXX)
trap 'rm -rf "$work"' EXIT
log() { printf '[pip install] %s\n' "$*"; }
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done \
  | xargs -0 cp --parents -t "$work"
mkdir "$work/src" && mv "$work"/* "$work/src/" 2> /dev/null || true

python -m venv "$work/venv"
pip=$work/venv/bin/pip
"$pip" install -q --upgrade pip setuptools wheel
log "$("$pip" --version)"

if "$pip" install "$work/src" > "$work/no_torch.log" 2>&1; then
  log "FAIL: pip install . succeeded without torch"; exit 1
fi
grep -q "install torch first" "$work/no_torch.log" || { cat "$work/no_torch.log"; exit 1; }
log "without torch: $(grep -m1 -o 'rmi_ext builds against.*' "$work/no_torch.log")"

grep -E '^torch==' requirements-dev.txt | "$pip" install -q -r /dev/stdin
torch_before=$("$work/venv/bin/python" -c 'import torch; print(torch.__version__)')
"$pip" install "$work/src" > "$work/install.log" 2>&1 || { tail -n 40 "$work/install.log"; exit 1; }
if grep -E -i '(Downloading|Collecting) torch' "$work/install.log"; then
  log "FAIL: the build downloaded a torch"; exit 1
fi
(cd "$work" && venv/bin/python - "$torch_before") <<'EOF'
import sys
import torch
import rmi_ext
assert torch.__version__ == sys.argv[1], (torch.__version__, sys.argv[1])
assert rmi_ext.backend_info("cpu")["auto"] == "cpu", rmi_ext.backend_info("cpu")
x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
y = torch.randint(0, 3, (2, 16, 16))
a, b = rmi_ext.rmi_loss(x, y, backend="cpu"), rmi_ext.rmi_loss(x, y, backend="reference")
assert torch.allclose(a, b, rtol=1e-10, atol=0), (a, b)
print("[pip install] built against torch", torch.__version__, "- cpu backend matches the reference")
EOF
