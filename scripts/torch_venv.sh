#!/usr/bin/env bash
# A venv with an older torch from PyPI, for running the suites on the torch builds Ascend users
# pair torch_npu with: .venv-torch<version> with that torch, megatron-core (0.12.1 unless
# MCORE=...) and the plugin (editable). Safe to run again.
#
# Usage: bash scripts/torch_venv.sh 2.7.1
#
# PyPI's linux x86_64 torch wheels are CUDA builds: `import torch` needs the CUDA libraries they
# list as nvidia-* requirements even on a CPU. torch is installed --no-deps, then the requirements
# its own metadata declares for this platform, less triton (nothing here compiles kernels), so the
# exact pinned nvidia-* wheels come in and pip never resolves torch itself again.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:?usage: torch_venv.sh TORCH_VERSION}
MCORE=${MCORE-0.12.1}
PY=${PYTHON:-python3}
dir=".venv-torch$V"
[ -f "$dir/.complete" ] && { echo "torch_venv.sh: $dir ready"; exit 0; }
rm -rf "$dir"
"$PY" -m venv "$dir"
PIP="$dir/bin/python -m pip --disable-pip-version-check -q"
$PIP install --no-deps "torch==$V"
mapfile -t reqs < <("$dir/bin/python" - <<'EOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("torch") or []:
    r = Requirement(line)
    if r.name != "triton" and (r.marker is None or r.marker.evaluate({"extra": ""})):
        print(str(r).split(";")[0])
EOF
)
# torch 2.1 was built against NumPy 1.x (its numpy bridge fails under NumPy 2).
numpy=numpy
case "$V" in 2.[0-2].*) numpy="numpy<2" ;; esac
$PIP install "${reqs[@]}" "$numpy" "pyyaml>=6" "packaging>=24.2" ninja "pytest>=7" "hypothesis>=6" matplotlib psutil
[ -n "$MCORE" ] && $PIP install --no-deps "megatron-core==$MCORE"
# --no-deps: everything it needs is above; the point of this venv is the torch it already has.
$PIP install --no-deps -e .
"$dir/bin/python" -c "import torch, gmm_plugin; print('torch_venv.sh: $dir: torch', torch.__version__)"
touch "$dir/.complete"
