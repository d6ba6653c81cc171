"""Shared helpers of the robustness suite: hypothesis profiles, the tally and its summary, input
layouts, and float64 reference values, gradients and error bounds built on tests/reference.py.

Profiles (env HYPOTHESIS_PROFILE, default `ci`): `ci` runs about 2,400 generated cases, `dev`
a tenth of that, `thorough` ten times as many. All are derandomized, so a failure reproduces.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter

import torch
from hypothesis import HealthCheck, settings

from reference import gmm_reference  # tests/reference.py: the independent float64 ground truth

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---- hypothesis profiles -------------------------------------------------------------------------

_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
_UNITS = {"ci": 100, "dev": 10, "thorough": 1000}
for _name, _unit in _UNITS.items():
    settings.register_profile(f"robustness-{_name}", max_examples=_unit, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in _UNITS:
    PROFILE = "ci"


def robust_settings(share: int) -> settings:
    """Settings of one property test: `share` examples per 100 of the profile's unit."""
    base = settings.get_profile(f"robustness-{PROFILE}")
    return settings(base, max_examples=max(1, base.max_examples * share // 100))


# ---- tally and summary ---------------------------------------------------------------------------

FIGURES = (
    ("cases_generated", "property-based cases generated (hypothesis examples run)"),
    ("valid_cases", "valid calls checked against the float64 reference, forward and backward"),
    ("invalid_inputs", "invalid inputs tried (each must raise TypeError/ValueError naming the argument)"),
    ("hostile_group_lists", "hostile device-style group_lists through safe_offsets and the kernels"),
    ("config_errors", "malformed configs tried (each a ConfigError naming file and key)"),
    ("determinism_repeats", "repeated runs compared bitwise (outputs and gradients)"),
    ("kills_survived", "SIGKILLs of the pretraining example survived"),
    ("crashes", "crashes (an unexpected exception or error type)"),
    ("wrong_results", "wrong results (reference mismatch, NaN/garbage, nondeterminism, unnamed argument)"),
    ("checkpoints_lost", "checkpoints lost (resume did not find the last complete checkpoint)"),
)
MUST_BE_ZERO = ("crashes", "wrong_results", "checkpoints_lost")
tally: Counter = Counter()
_START = time.time()


def count(key: str, n: int = 1) -> None:
    tally[key] += n


def summary_dir() -> str:
    return os.environ.get("GMM_ROBUSTNESS_DIR") or os.path.join(ROOT, "runs", "robustness")


def write_summary() -> tuple[str, str]:
    """Write summary.json and summary.md under summary_dir(); return (markdown, directory)."""
    figures = {key: int(tally.get(key, 0)) for key, _ in FIGURES}
    extra = {k: v for k, v in sorted(tally.items()) if k not in figures}
    data = {"figures": figures, "ok": all(figures[k] == 0 for k in MUST_BE_ZERO), "extra": extra,
            "hypothesis_profile": PROFILE, "torch": torch.__version__,
            "seconds": round(time.time() - _START, 1)}
    lines = ["# gmm-plugin robustness summary", "",
             f"hypothesis profile `{PROFILE}`, torch {torch.__version__}, {data['seconds']} s", "",
             "| figure | count |", "|---|---:|"]
    lines += [f"| {text} | {figures[key]} |" for key, text in FIGURES]
    lines += [f"| {key} | {value} |" for key, value in extra.items()]
    md = "\n".join(lines) + "\n"
    out = summary_dir()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    return md, out


def expect(ok: bool, what: str, key: str = "wrong_results") -> None:
    """Count a failed check in the tally, then fail the test."""
    if not ok:
        count(key)
        raise AssertionError(what)


# ---- backends ------------------------------------------------------------------------------------

try:  # tests/torch_npu_double.py: torch_npu's grouped-matmul ops on CPU tensors, for the npu backend
    import torch_npu_double
except ImportError:  # pragma: no cover
    torch_npu_double = None


def cpu_backends() -> list[str]:
    """Every backend that runs on CPU tensors here: torch, reference, and npu through the torch_npu
    test double (which fails on any input the real kernel would mishandle silently)."""
    return ["torch", "reference"] + (["npu"] if torch_npu_double is not None else [])


@contextlib.contextmanager
def using_backend(name: str):
    """Force backend `name` for the block (with the torch_npu double standing in for npu)."""
    from gmm_plugin import settings
    from gmm_plugin.backends import get_backend
    with torch_npu_double.installed() if name == "npu" else contextlib.nullcontext():
        previous = settings.configure(backend=name)
        try:
            yield get_backend(name)
        finally:
            settings.configure(previous)


# ---- layouts -------------------------------------------------------------------------------------

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS_2D = ("contiguous", "transposed", "strided", "offset")
LAYOUTS_3D = ("contiguous", "transposed", "strided", "offset", "expanded")


def bias_dtype(dtype):
    return torch.float16 if dtype == torch.float16 else torch.float32


def randn(shape, dtype, gen):
    # Values rounded to dtype first: the float64 reference sees exactly the same numbers.
    return torch.randn(*shape, generator=gen).to(dtype)


def leaf_2d(rows, cols, layout, dtype, gen, requires_grad=False):
    """(leaf, view) with view of shape [rows, cols] in the given memory layout."""
    if layout == "contiguous":
        base = randn((rows, cols), dtype, gen)
        make = lambda b: b  # noqa: E731
    elif layout == "transposed":
        base = randn((cols, rows), dtype, gen)
        make = lambda b: b.t()  # noqa: E731
    elif layout == "strided":
        base = randn((rows, 2 * cols), dtype, gen)
        make = lambda b: b[:, ::2]  # noqa: E731
    elif layout == "offset":  # misaligned data pointer: not 16-byte aligned
        base = randn((rows * cols + 1,), dtype, gen)
        make = lambda b: b[1:].view(rows, cols)  # noqa: E731
    else:
        raise AssertionError(layout)
    base.requires_grad_(requires_grad)
    return base, make(base)


def leaf_3d(e, k, n, layout, dtype, gen, requires_grad=False):
    """(leaf, view) with view of shape [e, k, n]."""
    if layout == "contiguous":
        base, make = randn((e, k, n), dtype, gen), (lambda b: b)
    elif layout == "transposed":  # Linear-style [E, N, K] storage, as MindSpeed's transposed weights
        base, make = randn((e, n, k), dtype, gen), (lambda b: b.transpose(-1, -2))
    elif layout == "strided":
        base, make = randn((e, k, 2 * n), dtype, gen), (lambda b: b[..., ::2])
    elif layout == "offset":
        base, make = randn((e * k * n + 1,), dtype, gen), (lambda b: b[1:].view(e, k, n))
    elif layout == "expanded":  # stride 0 over experts: one weight shared by all groups
        base, make = randn((1, k, n), dtype, gen), (lambda b: b.expand(e, k, n))
    else:
        raise AssertionError(layout)
    base.requires_grad_(requires_grad)
    return base, make(base)


# ---- reference values, gradients and error bounds -------------------------------------------------

def _d(t):
    return None if t is None else t.detach().double()


def reference_forward(x, w, counts, group_type, bias=None):
    """(value, magnitude): float64 result and the same product over |x|, |w|, |bias|."""
    x, w, b = _d(x), _d(w), _d(bias)
    ref = gmm_reference(x, w, counts, group_type, b)
    mag = gmm_reference(x.abs(), w.abs(), counts, group_type, None if b is None else b.abs())
    return ref, mag


def _group_sums(g, counts):
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return torch.stack([g[s:s + c].sum(0) for s, c in zip(starts, counts)])


def reference_grads(x, w, counts, group_type, g, bias_shape=None):
    """{name: (value, magnitude)} of dx, dw, dbias for grad_output g, all in float64 via
    gmm_reference: dx and dw of a grouped product are grouped products themselves."""
    x, w, g = _d(x), _d(w), _d(g)
    out = {}

    def pair(fn):
        return fn(x, w, g), fn(x.abs(), w.abs(), g.abs())

    if group_type == 0:
        out["x"] = pair(lambda x, w, g: gmm_reference(g, w.transpose(-1, -2), counts, 0))
        out["weight"] = pair(lambda x, w, g: gmm_reference(x.t(), g, counts, 2))
        if bias_shape is not None:
            out["bias"] = pair(lambda x, w, g: _group_sums(g, counts))
    elif group_type == 2:
        out["x"] = pair(lambda x, w, g: gmm_reference(w, g.transpose(1, 2), counts, 0).t())
        out["weight"] = pair(lambda x, w, g: gmm_reference(x.t(), g, counts, 0))
        if bias_shape is not None:
            out["bias"] = pair(lambda x, w, g: g.sum(1))
    else:
        out["x"] = pair(lambda x, w, g: g @ w.t())
        out["weight"] = pair(lambda x, w, g: x.t() @ g)
        if bias_shape is not None:
            out["bias"] = pair(lambda x, w, g: g.sum(0).reshape(bias_shape))
    return out


def within(actual, ref, mag, dtype, k):
    """Rigorous forward error bound: |actual - ref| <= (2 eps(dtype) + 2 k u32) * mag + tiny.

    `mag` is the same product over absolute values, so the bound is per element: up to two
    roundings to `dtype` (GEMM result, then + bias) and worst-case fp32 accumulation of k terms
    (gamma_k ~ k * 2^-24, doubled). fp16 adds an absolute half subnormal ulp. Garbage, a
    missing row or a wrong group all exceed it by orders of magnitude.
    """
    if actual is None or actual.shape != ref.shape:
        return False
    a = actual.detach().double()
    if not torch.isfinite(a).all():
        return False
    tiny = 2.0 ** -24 if dtype == torch.float16 else 1e-300
    bound = (2 * EPS[dtype] + 2 * max(k, 1) * 2.0 ** -24) * mag + tiny
    return bool(((a - ref).abs() <= bound).all())


def names_argument(message: str, name: str) -> bool:
    """The message names the argument as a word (x in 'x.shape[1]', not in 'max')."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None
