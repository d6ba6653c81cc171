"""The CANN double (cann_double.c), built with the machine's C compiler, and its op-suite variant.

`library(*flags)` builds the double once per set of -D flags (CANN_DOUBLE_NO_V5, _NO_V4, _NO_ADD,
_NO_ADDV2: exports dropped) into a per-process directory and returns its path; `selected(path)`
points the aclnn backend at it (GMM_PLUGIN_CANN_LIB) for a block and checks on the way out that
every object the binding created was destroyed and no ownership rule was broken. `live(path)` and
`count(path, what)` read the double's own counters. VARIANTS: the op suite through the real binding
on the full double (V5 and AddV2, the binding's path); the partial-export builds get targeted tests
(tests/test_aclnn_abi.py), not the whole suite.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import subprocess
import tempfile

from variants import Variant

SOURCE = os.path.join(os.path.dirname(__file__), "cann_double.c")
KINDS = ("aclTensor", "aclTensorList", "aclIntArray", "aclOpExecutor", "violations")
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
_built: dict[tuple[str, ...], str] = {}
_root: str | None = None


def library(*flags: str) -> str:
    """The double built with `-D<flag>` for each flag (e.g. "CANN_DOUBLE_NO_V5"); its path."""
    global _root
    key = tuple(sorted(flags))
    if key not in _built:
        if CC is None:
            raise RuntimeError("no C compiler (CC, cc or gcc) to build the CANN double")
        if _root is None:
            _root = tempfile.mkdtemp(prefix="gmm_cann_double_")
            atexit.register(shutil.rmtree, _root, True)
        path = os.path.join(_root, "libcann_double" + "".join("-" + f.lower() for f in key) + ".so")
        cmd = [CC, "-O2", "-std=gnu11", "-Wall", "-shared", "-fPIC", *("-D" + f for f in key), "-o", path, SOURCE]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode:
            raise RuntimeError(f"building the CANN double failed: {' '.join(cmd)}\n{result.stderr}")
        _built[key] = path
    return _built[key]


def count(path: str, what: str) -> int:
    """One of the double's counters: live objects of a kind, "violations", or an op's successful runs."""
    fn = ctypes.CDLL(path).cann_double_count
    fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_char_p]
    return fn(what.encode())


def live(path: str) -> dict[str, int]:
    """Live objects per kind, and ownership/lifetime violations."""
    return {k: count(path, k) for k in KINDS}


@contextlib.contextmanager
def selected(path: str, *, as_on_an_npu: bool = True):
    """The aclnn backend bound to the double at `path` for the block; no object left alive after it.
    as_on_an_npu: `fused_wgrad_dtype: auto` resolved as on an NPU (fp32 products, the Add kernel's)."""
    from gmm_plugin import settings
    saved = os.environ.get("GMM_PLUGIN_CANN_LIB")
    os.environ["GMM_PLUGIN_CANN_LIB"] = path
    before = live(path)
    previous = settings.configure(fused_wgrad_dtype="fp32") \
        if as_on_an_npu and settings.configure().fused_wgrad_dtype == "auto" else None
    try:
        yield path
    finally:
        if previous is not None:
            settings.configure(previous)
        if saved is None:
            os.environ.pop("GMM_PLUGIN_CANN_LIB", None)
        else:
            os.environ["GMM_PLUGIN_CANN_LIB"] = saved
    after = live(path)
    assert after == before, f"CANN double objects left alive or rules broken in the block: {after} (was {before})"


RULE_TESTS = "CANN_DOUBLE_RULE_TESTS"  # the flag of the build tests/test_aclnn_abi.py breaks rules on
OPS = ("aclnnGroupedMatmulV4", "aclnnGroupedMatmulV5", "aclnnGroupedMatmulAdd", "aclnnGroupedMatmulAddV2")


def summary() -> list[str]:
    """One line per double built in this process: its live objects and violations at the end (all
    zero unless something leaked) and the successful runs of each op."""
    lines = []
    for flags, path in sorted(_built.items()):
        state = ", ".join(f"{k} {v}" for k, v in live(path).items())
        runs = ", ".join(f"{op[len('aclnnGroupedMatmul'):] or 'V1'} {count(path, op)}" for op in OPS)
        why = " (violations made on purpose by the rule tests)" if RULE_TESTS in flags else ""
        lines.append(f"CANN double {' '.join(flags) or '(full)'}: live at the end: {state}{why}; runs: {runs}")
    return lines


NOT_APPLICABLE = {
    "test_gradcheck_float64": "aclnn GroupedMatmul has no float64 (the public API never passes it)",
}
VARIANTS = [Variant("aclnn", "aclnn", lambda: selected(library()), NOT_APPLICABLE)] if CC else []
