"""The project's test command: pytest in this interpreter, then the Megatron version matrix.

Usage: .venv/bin/python tools/run_tests.py [extra pytest args]

1. pytest on the whole suite (with the extra args) against the megatron-core installed here;
2. for every .mcore/<version>/ made by scripts/setup.sh: pytest tests/patches with that folder
   first on PYTHONPATH (the extra args are not passed on; the matrix is skipped when extra args
   are given, unless GMM_MCORE_MATRIX=1; GMM_MCORE_MATRIX=0 always skips it);
3. for every .venv-torch<version>/ made by scripts/torch_venv.sh (setup.sh makes torch 2.7.1's):
   the op suite, the top-level tests and tests/patches in that venv, on that torch and its
   megatron-core (skipped like the matrix, with GMM_TORCH_VENVS=0/1).
The last line is the combined count, `N passed, N failed, N skipped`; the exit status is non-zero
when anything failed.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCORE_DIR = os.path.join(ROOT, ".mcore")


def _counts(junit_path: str) -> tuple[int, int, int] | None:
    """(passed, failed, skipped) from a pytest junit XML file; errors count as failed."""
    try:
        root = ET.parse(junit_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tests = failed = skipped = 0
    for s in suites:
        tests += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def _pytest(label: str, args: list[str], env: dict | None = None, python: str = sys.executable) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory(prefix="gmm_tests_") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
        print(f"\n=== {label}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        counts = _counts(junit)
    if counts is None:
        print(f"=== {label}: pytest exited {rc} without a report", flush=True)
        return 0, 1, 0
    passed, failed, skipped = counts
    if rc not in (0, 5) and failed == 0:  # pytest failed outside any test (e.g. usage error)
        failed = 1
    print(f"=== {label}: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return passed, failed, skipped


def _matrix() -> list[str]:
    if not os.path.isdir(MCORE_DIR):
        return []
    return sorted(os.path.join(MCORE_DIR, d) for d in os.listdir(MCORE_DIR)
                  if os.path.isdir(os.path.join(MCORE_DIR, d, "megatron")))


def _torch_venvs() -> list[str]:
    return sorted(os.path.dirname(f) for f in glob.glob(os.path.join(ROOT, ".venv-torch*", ".complete")))


def _torch_leg(venv: str) -> list[tuple[int, int, int]]:
    """The op suite, the top-level tests and tests/patches on the venv's torch and megatron-core."""
    python = os.path.join(venv, "bin", "python")
    query = "import importlib.metadata as m, torch; print(torch.__version__, m.version('megatron-core'))"
    try:
        torch_version, mcore = subprocess.check_output([python, "-c", query], cwd=ROOT, text=True).split()
    except (OSError, subprocess.CalledProcessError, ValueError):
        print(f"=== {os.path.basename(venv)}: cannot import torch and megatron-core there", flush=True)
        return [(0, 1, 0)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["GMM_EXPECT_MCORE"] = mcore
    label = f"torch {torch_version}, megatron-core {mcore}"
    top_level = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    parts = [(f"{label}: tests/ops", ["tests/ops"]), (f"{label}: tests/*.py", top_level),
             (f"{label}: tests/patches", ["tests/patches"])]
    counts = [_pytest(name, args, env, python) for name, args in parts]
    print(f"=== {label} (all three): " + ", ".join(
        f"{sum(c[i] for c in counts)} {word}" for i, word in enumerate(("passed", "failed", "skipped"))), flush=True)
    return counts


def _wanted(flag: str, extra: list[str]) -> bool:
    value = os.environ.get(flag)
    return value != "0" and (not extra or value == "1")


def main() -> int:
    extra = sys.argv[1:]
    totals = [_pytest("whole suite", extra)]
    if _wanted("GMM_MCORE_MATRIX", extra):
        for folder in _matrix():
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, env.get("PYTHONPATH")) if p)
            env["GMM_EXPECT_MCORE"] = os.path.basename(folder)  # checked by tests/patches/test_versions.py
            totals.append(_pytest(f"megatron-core {os.path.basename(folder)}", ["tests/patches"], env))
    if _wanted("GMM_TORCH_VENVS", extra):
        for venv in _torch_venvs():
            totals += _torch_leg(venv)
    passed, failed, skipped = (sum(t[i] for t in totals) for i in range(3))
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
