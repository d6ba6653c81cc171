"""The performance targets, evaluated on the rows of a run (issue 7's, and issue 14's "the
default config is never slower than SequentialMLP"); each is met, not met, or not measured."""
from __future__ import annotations

from dataclasses import dataclass

from . import cuda_checks, layer_suite, ops_suite
from .cases import DTYPES
from .measure import Row, paired_speedup


@dataclass
class Target:
    name: str
    measured: str
    met: bool | None   # None: not measured here


def find(rows: list[Row], **kw) -> Row | None:
    for r in rows:
        if all(getattr(r, k) == v for k, v in kw.items()):
            return r
    return None


def evaluate_targets(rows: list[Row]) -> list[Target]:
    return _gmm_targets(rows) + _fp16_targets(rows) + _layer_targets(rows) + _example_targets(rows) \
        + _cuda_targets(rows)


def _blocks(rows: list[Row], suite: str, dtypes=None):
    """(dtype, experts) of the suite's rows, in the order of DTYPES and expert count."""
    keys = {(r.dtype, r.experts) for r in rows if r.suite == suite and (dtypes is None or r.dtype in dtypes)}
    return sorted(keys, key=lambda k: (list(DTYPES).index(k[0]) if k[0] in DTYPES else len(DTYPES), k[1]))


def _gmm_targets(rows: list[Row]) -> list[Target]:
    out = []
    for d, E in _blocks(rows, "gmm", dtypes=("fp32", "bf16")):
        r = find(rows, suite="gmm", op="forward", dtype=d, experts=E, impl="gmm-plugin")
        if r:
            out.append(Target(f"GMM forward {d} E={E} <= 1.05x dense", f"{r.ratio_to_dense:.3f}x",
                              r.ratio_to_dense <= 1.05))
        r = find(rows, suite="gmm", op="forward+backward", dtype=d, experts=E, impl="gmm-plugin")
        if r:
            lim = 1.10 if E <= 8 else 1.20
            out.append(Target(f"GMM fwd+bwd {d} E={E} <= {lim:.2f}x 3 dense", f"{r.ratio_to_dense:.3f}x",
                              r.ratio_to_dense <= lim))
        u = find(rows, suite="gmm", op="fused backward", dtype=d, experts=E, impl=ops_suite.UNFUSED)
        fused = [(ops_suite.FUSED, "")] + [(name, f" (fused_wgrad_dtype {dt})") for dt, name in ops_suite.FUSED_AS.items()]
        for impl, how in fused:
            f = find(rows, suite="gmm", op="fused backward", dtype=d, experts=E, impl=impl)
            if not (f and u):
                continue
            out.append(Target(f"fused backward {d} E={E}{how} no slower than unfused",
                              f"{f.time_ms / u.time_ms:.3f}x unfused", f.time_ms <= u.time_ms))
            if f.peak_mb is not None and u.peak_mb is not None:
                wg = f.extra["wgrad_mb"]
                saved = u.peak_mb - f.peak_mb
                out.append(Target(f"fused backward {d} E={E}{how} peak lower by >= 80% of wgrad",
                                  f"{saved:.1f} MB lower = {saved / wg:.0%} of {wg:.1f} MB", saved >= 0.8 * wg))
    return out


def _fp16_targets(rows: list[Row]) -> list[Target]:
    out = []
    for _, E in _blocks(rows, "gmm", dtypes=("fp16",)):
        r = find(rows, suite="gmm", op="forward", dtype="fp16", experts=E, impl="gmm-plugin")
        dense = find(rows, suite="gmm", op="forward", dtype="fp16", experts=E, impl=ops_suite.DENSE)
        if r and dense:
            err, tol = r.extra["max_abs_err"], r.extra["tolerance"]
            speed = dense.time_ms / r.time_ms
            out.append(Target(f"fp16 CPU E={E} >= 50x torch.mm fp16, within fp16 tolerance",
                              f"{speed:.0f}x, err {err:.3g} <= {tol:.3g}", speed >= 50 and err <= tol))
    return out


def _layer_targets(rows: list[Row]) -> list[Target]:
    """Every plugin row against SequentialMLP of its block; the default config's rows are the ones
    that must hold, the explicit fused_wgrad_dtype rows show what each choice gives."""
    out = []
    explicit = {name: f", fused_wgrad_dtype {dt}" for dt, name in layer_suite.PLUGIN_AS.items()}
    for r in rows:
        if r.suite != "layer" or r.impl not in (layer_suite.PLUGIN, *explicit):
            continue
        seq = find(rows, suite="layer", op=r.op, dtype=r.dtype, experts=r.experts, impl=layer_suite.SEQUENTIAL)
        speed = paired_speedup(seq, r)
        name = f"MoE layer {r.dtype} E={r.experts} {r.extra['grads']}{explicit.get(r.impl, '')}"
        who = "default " if r.impl == layer_suite.PLUGIN else ""
        measured = f"{speed:.3f}x SequentialMLP speed (best times {seq.time_ms / r.time_ms:.3f}x)"
        out.append(Target(f"{name}: {who}>= SequentialMLP", measured, speed >= 1.0))
        if r.experts > 8:
            out.append(Target(f"{name}: >= 1.15x SequentialMLP", measured, speed >= 1.15))
        out.append(Target(f"{name}: <= 1.25x its GEMMs at dense speed", f"{r.ratio_to_dense:.3f}x",
                          r.ratio_to_dense <= 1.25))
    return out


def _example_targets(rows: list[Row]) -> list[Target]:
    plug = find(rows, suite="example", impl="gmm-plugin")
    base = find(rows, suite="example", impl="Megatron experts")
    if not (plug and base):
        return []
    gain = plug.extra["tokens_per_s"] / base.extra["tokens_per_s"]
    return [Target("pretraining example tokens/s with the plugin >= 1.1x without", f"{gain:.3f}x", gain >= 1.1)]


def _cuda_targets(rows: list[Row]) -> list[Target]:
    out = []
    for r in rows:
        if r.suite == "cuda" and r.op == "sync check":
            out.append(Target(f"CUDA E={r.experts} {r.impl}: free of host syncs", r.note,
                              r.note == cuda_checks.NO_SYNC))
        elif r.suite == "cuda" and r.op == "forward overhead" and r.impl == "gmm-plugin":
            out.append(Target(f"CUDA E={r.experts} overhead over torch._grouped_mm <= 3%",
                              f"{(r.ratio_to_dense - 1) * 100:+.1f}%", r.ratio_to_dense <= 1.03))
    return out
