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
$PIP install -e ".[megatron,test]"
echo "setup.sh: .venv ready"
