#!/usr/bin/env bash
# Fresh set-up from nothing: a venv in .venv with torch 2.13.0 (CPU), the plugin (editable) and
# everything the tests and the example need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: the local CPU wheel. A bare 'torch' requirement would pull a CUDA build.
$PIP install torch==2.13.0
$PIP install -e ".[megatron,test]"   # the test extra has psutil: torch_dist saving hangs without it

# Megatron-core version matrix for tests/patches: every version of MCORE_MATRIX other than the one
# in .venv goes to .mcore/<version> (pip --target, --no-deps: torch, numpy and packaging come from
# .venv); tools/run_tests.py runs tests/patches once per folder with it first on PYTHONPATH.
# 0.17+ declare Requires-Python >=3.12 but ship cp311 wheels that work; they import triton
# unconditionally (a 3.9.0 wheel, no dependencies). MCORE_MATRIX="" skips the matrix.
MCORE_MATRIX=${MCORE_MATRIX-"0.12.1 0.16.1 0.19.2"}
main_mcore=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('megatron-core'))" 2>/dev/null || true)
needs_triton() { case "$1" in 0.1[7-9].*) return 0 ;; *) return 1 ;; esac; }
if needs_triton "$main_mcore" && ! .venv/bin/python -c "import triton" 2>/dev/null; then
    $PIP install --no-deps triton==3.9.0
fi
for v in $MCORE_MATRIX; do
    [ "$v" = "$main_mcore" ] && continue
    dir=".mcore/$v"
    [ -f "$dir/.complete" ] && continue
    rm -rf "$dir"
    $PIP install --no-deps --ignore-requires-python --target "$dir" "megatron-core==$v"
    if needs_triton "$v"; then $PIP install --no-deps --target "$dir" triton==3.9.0; fi
    touch "$dir/.complete"
done
# An older torch for tools/run_tests.py's torch leg: PyPI's torch 2.7.1 (the one build every
# torch_npu release from 7.2.0 to 26.1.0 pairs with; a CUDA build, ~3 GB of downloads with its
# nvidia-* libraries) and megatron-core 0.12.1 in .venv-torch2.7.1 (scripts/torch_venv.sh).
# OLD_TORCH="" skips it; OLD_TORCH="2.1.2 2.7.1" makes more.
for v in ${OLD_TORCH-2.7.1}; do
    start=$SECONDS
    bash scripts/torch_venv.sh "$v"
    echo "setup.sh: .venv-torch$v ready ($((SECONDS - start)) s)"
done
echo "setup.sh: .venv ready (megatron-core ${main_mcore:-none}; matrix: $(ls .mcore 2>/dev/null | tr '\n' ' '))"
