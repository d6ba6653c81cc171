"""The project's test command: pytest in this interpreter, then the Megatron version matrix.

Usage: .venv/bin/python tools/run_tests.py [extra pytest args]

1. pytest on the whole suite (with the extra args) against the megatron-core installed here;
2. for every .mcore/<version>/ made by scripts/setup.sh: pytest tests/patches with that folder
   first on PYTHONPATH (the extra args are not passed on; the matrix is skipped when extra args
   are given, unless GMM_MCORE_MATRIX=1; GMM_MCORE_MATRIX=0 always skips it).
The last line is the combined count, `N passed, N failed, N skipped`; the exit status is non-zero
when anything failed.
"""
from __future__ import annotations

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


def _pytest(label: str, args: list[str], env: dict | None = None) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory(prefix="gmm_tests_") as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
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


def main() -> int:
    extra = sys.argv[1:]
    totals = [_pytest("whole suite", extra)]
    flag = os.environ.get("GMM_MCORE_MATRIX")
    if flag != "0" and (not extra or flag == "1"):
        for folder in _matrix():
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, env.get("PYTHONPATH")) if p)
            env["GMM_EXPECT_MCORE"] = os.path.basename(folder)  # checked by tests/patches/test_versions.py
            totals.append(_pytest(f"megatron-core {os.path.basename(folder)}", ["tests/patches"], env))
    passed, failed, skipped = (sum(t[i] for t in totals) for i in range(3))
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
