"""`gmm-plugin bench` / `python -m gmm_plugin.bench`: how fast is the grouped matmul, and against what.

Suites (``--suite``):

* ``gmm``: GMM forward, forward+backward and fused backward (gemm_fusion into an fp32
  ``main_grad``) for MoE shapes with uneven expert sizes (some experts empty), against one dense
  ``torch.mm`` of the same FLOPs, a per-group ``torch.mm`` loop, and ``torch._grouped_mm`` called
  directly. On CPU, fp16 is compared with a dense fp16 ``torch.mm`` (timed on a few rows and
  scaled to the full size: the full product takes about a minute at ~1 GFLOP/s).
* ``layer``: a Megatron-core MoE layer forward+backward with the plugin (``patches.apply``)
  against SequentialMLP and, where the installed megatron-core has it, the legacy GroupedMLP with
  a per-expert loop standing in for the missing ``grouped_gemm`` package.
* ``cuda`` (only when CUDA exists): the GMM path under ``torch.cuda.set_sync_debug_mode("error")``
  with group_list on the device, and the plugin's overhead over a direct ``torch._grouped_mm``.

Timing: every case of a group runs once per round, the rounds rotate the order, and the figure is
the minimum over the rounds; ratios compare cases timed in the same process and the same rounds.
Peak memory is the growth of the resident set during one call on CPU (see `peak_bytes`), and
``torch.cuda.max_memory_allocated`` above the starting point on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .settings import set_fused_wgrad_dtype
from .function import compute_dtype
from .ops.gmm import npu_gmm_v2

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
MB = 2.0 ** 20
SUITES = ("gmm", "layer", "cuda", "example")
FUSED_INPUT = "gmm-plugin gemm_fusion, input-dtype wgrad"   # fused_wgrad_dtype: input
FUSED_INPUT_LAYER = "gmm-plugin (fused_wgrad_dtype input)"


# ----------------------------------------------------------------------------------------- data

def moe_group_sizes(tokens: int, experts: int, seed: int = 0) -> list[int]:
    """Uneven per-expert token counts summing to `tokens`, with every 8th expert (from #3) empty.

    Log-normal loads (sigma 0.6) look like a real router's imbalance; rounding by largest
    remainder keeps the sum exact. Deterministic in (tokens, experts, seed).
    """
    g = torch.Generator().manual_seed(seed * 1000 + experts)
    load = torch.exp(torch.randn(experts, generator=g, dtype=torch.float64) * 0.6)
    if experts > 1:
        load[3 % experts::8] = 0.0
    raw = load / load.sum() * tokens
    sizes = raw.floor().long()
    rest = tokens - int(sizes.sum())
    sizes[torch.argsort(raw - sizes, descending=True)[:rest]] += 1
    return sizes.tolist()


# --------------------------------------------------------------------------------- measurement

@dataclass
class Row:
    suite: str
    op: str
    dtype: str
    experts: int
    impl: str
    time_ms: float | None
    gflops: float | None = None
    ratio_to_dense: float | None = None   # time / dense time (dense: the op's dense GEMM count)
    peak_mb: float | None = None
    note: str = ""
    samples_ms: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # figures the targets need (weight-grad size, errors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: dict, repeat: int, warmup: int, device: torch.device) -> dict:
    """{name: fn} -> {name: [ms per round]}; cases interleave round by round, order rotating."""
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    _sync(device)
    samples = {n: [] for n in names}
    for r in range(repeat):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            cases[n]()
            _sync(device)
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return samples


def peak_bytes(fn, device: torch.device) -> int | None:
    """Highest memory use above the starting point while fn runs, in bytes.

    CUDA: torch's allocator statistics. CPU: the resident-set high-water mark (VmHWM, reset
    through /proc/self/clear_refs) after malloc_trim has handed freed heap pages back, so every
    page fn touches is counted, in every thread (the torch backend's GEMM workers included) and
    every allocator (MKL and oneDNN scratch included). Where /proc is unavailable it falls back
    to the profiler's allocation events, which see only the calling thread.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    try:
        return _rss_peak(fn)
    except (OSError, AttributeError, ValueError):
        return _profiler_peak(fn)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise ValueError(key)


def _rss_peak(fn) -> int:
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    fn()
    return max(0, _status_kb("VmHWM") - start) * 1024


def _profiler_peak(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # private profiler API moved: report no figure rather than a wrong one
        return None
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


class _quiet_stderr:
    """Silence fd 2 (kineto prints a line at every profiler start and stop)."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


# ------------------------------------------------------------------------------------ GMM suite

class GmmProblem:
    """x [M, K], w [E, K, N] (or an [E, N, K] parameter seen transposed), dy [M, N]."""

    def __init__(self, tokens, hidden, ffn, experts, dtype, device, layout="kn", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.M, self.K, self.N, self.E = tokens, hidden, ffn, experts
        self.dtype, self.device = dtype, device
        self.sizes = moe_group_sizes(tokens, experts, seed)
        self.counts = torch.tensor(self.sizes, dtype=torch.int64)  # Megatron's tokens_per_expert (host)
        if device.type == "cuda":
            self.counts = self.counts.to(device)
        self.offs = torch.tensor(self.sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

        self.x = rand(tokens, hidden)
        if layout == "kn":
            self.param = rand(experts, hidden, ffn, scale=hidden ** -0.5)
            self.w = self.param
        else:  # Linear-style [E, out, in] parameter, used as its transpose
            self.param = rand(experts, ffn, hidden, scale=hidden ** -0.5)
            self.w = self.param.transpose(-1, -2)
        self.dy = rand(tokens, ffn)
        self.w_dense = self.w[0].contiguous()

    def flops(self) -> float:
        return 2.0 * self.M * self.K * self.N

    def leaf(self, t):
        return t.detach().requires_grad_(True)


def _loop_forward(x, w, sizes):
    """What a per-expert loop (Megatron's SequentialMLP) does: mm per group, then cat."""
    parts = [torch.mm(xe, we) for xe, we in zip(torch.split(x, sizes), w.unbind(0))]  # unbind: one stack in backward
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def gmm_suite(args, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for E in args.experts:
            p = GmmProblem(args.tokens, args.hidden, args.ffn, E, dtype, device, args.layout, args.seed)
            if dtype == torch.float16 and device.type == "cpu":
                rows += _fp16_cpu_rows(p, args)
            else:
                rows += _gmm_rows(p, dname, args, device)
            _progress(args, rows)
    return rows


def _suite_name(device: torch.device) -> str:
    return "gmm" if device.type == "cpu" else f"gmm-{device.type}"


def _progress(args, rows):
    if args.verbose:
        for r in rows[-12:]:
            print("  ..", r.op, r.dtype, r.experts, r.impl, r.time_ms, file=sys.stderr, flush=True)


def _rows_from(samples, flops_of, dense_name, meta, peaks, notes=None) -> list[Row]:
    dense = min(samples[dense_name])
    out = []
    for name, s in samples.items():
        t = min(s)
        out.append(Row(**meta, impl=name, time_ms=round(t, 3), gflops=round(flops_of / t / 1e6, 1),
                       ratio_to_dense=round(t / dense, 4), note=(notes or {}).get(name, ""),
                       peak_mb=None if peaks.get(name) is None else round(peaks[name] / MB, 2),
                       samples_ms=[round(v, 3) for v in s]))
    return out


def _gmm_rows(p: GmmProblem, dname: str, args, device) -> list[Row]:
    rows = []
    x, w, dy, sizes, counts, offs = p.x, p.w, p.dy, p.sizes, p.counts, p.offs

    # ---- forward
    fwd = {
        "dense torch.mm": lambda: torch.mm(x, p.w_dense),
        "gmm-plugin": lambda: npu_gmm_v2(x, w, group_list=counts),
        "per-group loop": lambda: _loop_forward(x, w, sizes),
        "torch._grouped_mm": lambda: torch._grouped_mm(x, w, offs),
    }
    if not hasattr(torch, "_grouped_mm"):
        del fwd["torch._grouped_mm"]
    with torch.no_grad():
        samples = time_cases(fwd, args.repeat, args.warmup, device)
        peaks = {n: peak_bytes(f, device) for n, f in fwd.items()} if args.memory else {}
    meta = dict(suite=_suite_name(device), op="forward", dtype=dname, experts=p.E)
    rows += _rows_from(samples, p.flops(), "dense torch.mm", meta, peaks)

    # ---- forward + backward (3 GEMMs); grads are dropped after each call
    xl, wl = p.leaf(x), p.leaf(p.param)
    wv = wl if args.layout == "kn" else wl.transpose(-1, -2)

    def dense3():
        torch.mm(x, p.w_dense)
        torch.mm(dy, p.w_dense.t())
        torch.mm(x.t(), dy)

    def autograd(f):
        def run():
            f(xl, wv).backward(dy)
            xl.grad = wl.grad = None
        return run

    fb = {
        "dense torch.mm x3": dense3,
        "gmm-plugin": autograd(lambda a, b: npu_gmm_v2(a, b, group_list=counts)),
        "per-group loop": autograd(lambda a, b: _loop_forward(a, b, sizes)),
        "torch._grouped_mm": autograd(lambda a, b: torch._grouped_mm(a, b, offs)),
    }
    if not hasattr(torch, "_grouped_mm"):
        del fb["torch._grouped_mm"]
    samples = time_cases(fb, args.repeat, args.warmup, device)
    peaks = {n: peak_bytes(f, device) for n, f in fb.items()} if args.memory else {}
    meta = dict(suite=_suite_name(device), op="forward+backward", dtype=dname, experts=p.E)
    rows += _rows_from(samples, 3 * p.flops(), "dense torch.mm x3", meta, peaks)

    # ---- fused backward: weight gradient accumulated into an fp32 main_grad
    wl.main_grad = torch.zeros(wl.shape, dtype=torch.float32, device=device)

    def unfused():
        npu_gmm_v2(xl, wv, group_list=counts).backward(dy)
        wl.main_grad.add_(wl.grad)  # what Megatron's DDP hook does with an unfused gradient
        xl.grad = wl.grad = None

    def fused():
        npu_gmm_v2(xl, wv, group_list=counts, gemm_fusion=True, original_weight=wl).backward(dy)
        xl.grad = wl.grad = None

    def fused_input():
        set_fused_wgrad_dtype("input")
        try:
            fused()
        finally:
            set_fused_wgrad_dtype("fp32")

    fu = {"dense torch.mm x3": dense3, "gmm-plugin unfused + main_grad.add_": unfused,
          "gmm-plugin gemm_fusion": fused}
    if _wgrad_dtype_matters(p.dtype, device):
        fu[FUSED_INPUT] = fused_input
    samples = time_cases(fu, args.repeat, args.warmup, device)
    peaks = {n: peak_bytes(f, device) for n, f in fu.items()} if args.memory else {}
    wgrad_mb = p.param.numel() * p.param.element_size() / MB
    meta = dict(suite=_suite_name(device), op="fused backward", dtype=dname, experts=p.E)
    rows += _rows_from(samples, 3 * p.flops(), "dense torch.mm x3", meta, peaks,
                       notes={"gmm-plugin gemm_fusion": f"weight grad {wgrad_mb:.1f} MB"})
    for r in rows[-len(fu):]:
        r.extra["wgrad_mb"] = wgrad_mb
    del wl.main_grad
    return rows


def _wgrad_dtype_matters(dtype: torch.dtype, device: torch.device) -> bool:
    """fused_wgrad_dtype changes the GEMM only where the operands stay 16-bit (not fp16 on a CPU,
    which is computed in fp32 throughout)."""
    return compute_dtype(torch.empty(0, dtype=dtype, device=device)) != torch.float32


def _fp16_cpu_rows(p: GmmProblem, args) -> list[Row]:
    """fp16 on CPU: the plugin (fp32 compute, one rounding) against a dense fp16 torch.mm."""
    device = p.device
    rows = []
    r = max(1, min(args.fp16_dense_rows, p.M))
    xr = p.x[:r]
    dense = time_cases({"d": lambda: torch.mm(xr, p.w_dense)}, max(1, min(args.repeat, 2)), 0, device)["d"]
    dense_ms = min(dense) * p.M / r
    meta = dict(suite=_suite_name(device), op="forward", dtype="fp16", experts=p.E)
    note = f"timed on {r} of {p.M} rows, scaled by {p.M / r:g} (scalar fp16 kernel, ~1 GFLOP/s)"
    rows.append(Row(**meta, impl="dense torch.mm", time_ms=round(dense_ms, 3),
                    gflops=round(p.flops() / dense_ms / 1e6, 2), ratio_to_dense=1.0, note=note,
                    samples_ms=[round(v, 3) for v in dense]))
    with torch.no_grad():
        s = time_cases({"gmm-plugin": lambda: npu_gmm_v2(p.x, p.w, group_list=p.counts)},
                       args.repeat, args.warmup, device)["gmm-plugin"]
        y = npu_gmm_v2(p.x, p.w, group_list=p.counts)
        peak = peak_bytes(lambda: npu_gmm_v2(p.x, p.w, group_list=p.counts), device) if args.memory else None
    err, tol = _fp16_error(p, y)
    t = min(s)
    rows.append(Row(**meta, impl="gmm-plugin", time_ms=round(t, 3), gflops=round(p.flops() / t / 1e6, 1),
                    ratio_to_dense=round(t / dense_ms, 6),
                    peak_mb=None if peak is None else round(peak / MB, 2),
                    note=f"{dense_ms / t:.0f}x faster; max abs err {err:.3g} (fp16 tolerance {tol:.3g})",
                    samples_ms=[round(v, 3) for v in s], extra={"max_abs_err": err, "tolerance": tol}))
    return rows


def _fp16_error(p: GmmProblem, y) -> tuple[float, float]:
    """Max abs error of the fp16 result against float64, and the bound: one fp16 rounding
    (2 ulps at the largest output), which fp32 accumulation plus a single final rounding meets."""
    x64, w64 = p.x.double(), p.w.double()
    err = big = 0.0
    start = 0
    for e, c in enumerate(p.sizes):
        if c:
            ref = x64[start:start + c] @ w64[e]
            err = max(err, (y[start:start + c].double() - ref).abs().max().item())
            big = max(big, ref.abs().max().item())
        start += c
    return err, 2 * EPS[torch.float16] * big


# ---------------------------------------------------------------------------------- CUDA checks

def cuda_suite(args) -> list[Row]:
    """Host-sync freedom and the plugin's overhead over a direct torch._grouped_mm (bf16)."""
    device = torch.device("cuda")
    rows = []
    for E in args.experts:
        p = GmmProblem(args.tokens, args.hidden, args.ffn, E, torch.bfloat16, device, args.layout, args.seed)
        xl, wl = p.leaf(p.x), p.leaf(p.param)
        wv = wl if args.layout == "kn" else wl.transpose(-1, -2)
        npu_gmm_v2(xl, wv, group_list=p.counts).backward(p.dy)  # warm caches before the check
        note = "no host sync"
        try:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                npu_gmm_v2(xl, wv, group_list=p.counts).backward(p.dy)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        except RuntimeError as e:
            note = f"HOST SYNC: {str(e).splitlines()[0][:120]}"
        meta = dict(suite="cuda", op="sync check fwd+bwd", dtype="bf16", experts=E)
        rows.append(Row(**meta, impl="gmm-plugin (group_list on device)", time_ms=None, note=note))
        with torch.no_grad():
            cases = {"torch._grouped_mm": lambda: torch._grouped_mm(p.x, p.w, p.offs),
                     "gmm-plugin": lambda: npu_gmm_v2(p.x, p.w, group_list=p.counts)}
            samples = time_cases(cases, max(args.repeat, 20), max(args.warmup, 3), device)
        meta = dict(suite="cuda", op="forward overhead", dtype="bf16", experts=E)
        rows += _rows_from(samples, p.flops(), "torch._grouped_mm", meta, {})
    return rows


# ------------------------------------------------------------------------------------- targets

@dataclass
class Target:
    name: str
    measured: str
    met: bool | None   # None: not measured here


def _find(rows, **kw):
    for r in rows:
        if all(getattr(r, k) == v for k, v in kw.items()):
            return r
    return None


def evaluate_targets(rows: list[Row]) -> list[Target]:
    out = []
    dts = sorted({r.dtype for r in rows if r.suite == "gmm"}, key=list(DTYPES).index)
    exps = sorted({r.experts for r in rows if r.suite == "gmm"})
    for d in (d for d in dts if d != "fp16"):
        for E in exps:
            r = _find(rows, suite="gmm", op="forward", dtype=d, experts=E, impl="gmm-plugin")
            if r:
                out.append(Target(f"GMM forward {d} E={E} <= 1.05x dense", f"{r.ratio_to_dense:.3f}x",
                                  r.ratio_to_dense <= 1.05))
            r = _find(rows, suite="gmm", op="forward+backward", dtype=d, experts=E, impl="gmm-plugin")
            if r:
                lim = 1.10 if E <= 8 else 1.20
                out.append(Target(f"GMM fwd+bwd {d} E={E} <= {lim:.2f}x 3 dense", f"{r.ratio_to_dense:.3f}x",
                                  r.ratio_to_dense <= lim))
            u = _find(rows, suite="gmm", op="fused backward", dtype=d, experts=E,
                      impl="gmm-plugin unfused + main_grad.add_")
            for impl, how in (("gmm-plugin gemm_fusion", ""), (FUSED_INPUT, " (fused_wgrad_dtype input)")):
                f = _find(rows, suite="gmm", op="fused backward", dtype=d, experts=E, impl=impl)
                if not (f and u):
                    continue
                out.append(Target(f"fused backward {d} E={E}{how} no slower than unfused",
                                  f"{f.time_ms / u.time_ms:.3f}x unfused", f.time_ms <= u.time_ms))
                if f.peak_mb is not None and u.peak_mb is not None:
                    wg = f.extra["wgrad_mb"]
                    saved = u.peak_mb - f.peak_mb
                    out.append(Target(f"fused backward {d} E={E}{how} peak lower by >= 80% of wgrad",
                                      f"{saved:.1f} MB lower = {saved / wg:.0%} of {wg:.1f} MB",
                                      saved >= 0.8 * wg))
    for E in exps:
        r = _find(rows, suite="gmm", op="forward", dtype="fp16", experts=E, impl="gmm-plugin")
        if r:
            err, tol = r.extra["max_abs_err"], r.extra["tolerance"]
            speed = 1.0 / r.ratio_to_dense
            out.append(Target(f"fp16 CPU E={E} >= 50x torch.mm fp16, within fp16 tolerance",
                              f"{speed:.0f}x, err {err:.3g} <= {tol:.3g}", speed >= 50 and err <= tol))
    out += _layer_targets(rows)
    plug = _find(rows, suite="example", impl="gmm-plugin")
    base = _find(rows, suite="example", impl="Megatron experts")
    if plug and base:
        gain = plug.extra["tokens_per_s"] / base.extra["tokens_per_s"]
        out.append(Target("pretraining example tokens/s with the plugin >= 1.1x without",
                          f"{gain:.3f}x", gain >= 1.1))
    for E in exps:
        r = _find(rows, suite="cuda", op="sync check fwd+bwd", experts=E)
        if r:
            out.append(Target(f"CUDA E={E} GMM path free of host syncs", r.note, r.note == "no host sync"))
        r = _find(rows, suite="cuda", op="forward overhead", experts=E, impl="gmm-plugin")
        if r:
            out.append(Target(f"CUDA E={E} overhead over torch._grouped_mm <= 3%",
                              f"{(r.ratio_to_dense - 1) * 100:+.1f}%", r.ratio_to_dense <= 1.03))
    return out


# -------------------------------------------------------------------------------- example suite

def example_suite(args) -> tuple[list[Row], str | None]:
    """tokens/s of examples/pretrain_moe.py with and without --use-gmm-plugin (source checkout).

    The runs alternate (plain, plugin, plain, plugin, ...); each run's figure is its median step
    time after the first few steps, and the best run of each kind is reported.
    """
    import statistics
    import subprocess
    import tempfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "examples", "pretrain_moe.py")
    if not os.path.exists(script):
        return [], f"needs a source checkout with {os.path.relpath(script, root)}"
    config = args.example_config or os.path.join(root, "configs", "pretrain_tiny_cpu.yaml")
    skip = max(1, args.example_steps // 5)
    best: dict[str, list] = {"Megatron experts": [], "gmm-plugin": []}
    tokens = None
    with tempfile.TemporaryDirectory(prefix="gmm_bench_example_") as tmp:
        for r in range(args.example_runs):
            for name, flags in (("Megatron experts", []), ("gmm-plugin", ["--use-gmm-plugin"])):
                out = os.path.join(tmp, f"{r}_{len(flags)}")
                cmd = [sys.executable, script, "--config", config, "--steps", str(args.example_steps),
                       "--out-dir", out, "--save-interval", "0", "--no-plot", "--quiet",
                       "--set", "train.warmup_steps=1", *flags]  # short runs: warmup < steps
                if args.example_threads is not None:
                    cmd += ["--set", f"train.cpu_threads={args.example_threads}"]
                proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
                if proc.returncode != 0:
                    return [], f"the example failed ({' '.join(cmd[1:])}): {proc.stderr.strip()[-400:]}"
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    steps = [json.loads(line) for line in f if line.strip()]
                times = [st["step_time_s"] for st in steps[skip:]] or [st["step_time_s"] for st in steps]
                tokens = steps[0]["tokens_per_s"] * steps[0]["step_time_s"]
                best[name].append(statistics.median(times) * 1e3)
    base = min(best["Megatron experts"])
    rows = []
    for name, runs in best.items():
        t = min(runs)
        threads = "" if args.example_threads is None else f", cpu_threads={args.example_threads}"
        rows.append(Row(suite="example", op=f"pretrain_moe.py step ({os.path.basename(config)}{threads})", dtype="-",
                        experts=0, impl=name, time_ms=round(t, 2), ratio_to_dense=round(t / base, 4),
                        note=f"{tokens / t * 1e3:,.0f} tokens/s", samples_ms=[round(v, 2) for v in runs],
                        extra={"tokens_per_s": tokens / t * 1e3}))
    return rows, None


# -------------------------------------------------------------------------------------- output

def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    # glibc settings that decide whether big freed buffers are kept (see docs/benchmarks.md)
    info["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))
                          or k in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")}
    return info


def format_table(rows: list[Row]) -> str:
    head = ("suite", "op", "dtype", "E", "impl", "time ms", "GFLOP/s", "x dense", "peak MB", "note")
    body = [(r.suite, r.op, r.dtype, str(r.experts), r.impl,
             "-" if r.time_ms is None else f"{r.time_ms:.2f}",
             "-" if r.gflops is None else f"{r.gflops:.1f}",
             "-" if r.ratio_to_dense is None else f"{r.ratio_to_dense:.3f}",
             "-" if r.peak_mb is None else f"{r.peak_mb:.1f}", r.note) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 2, 4, 9) else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [fmt(head), fmt(["-" * w for w in widths])]
    last = None
    for cells, r in zip(body, rows):
        key = (r.suite, r.op, r.dtype, r.experts)
        if last is not None and key != last:
            lines.append("")
        lines.append(fmt(cells))
        last = key
    return "\n".join(lines)


def format_targets(targets: list[Target]) -> str:
    word = {True: "met", False: "NOT met", None: "not measured"}
    w = max((len(t.name) for t in targets), default=0)
    return "\n".join(f"{t.name.ljust(w)}  {t.measured:<34} {word[t.met]}" for t in targets)


def _short_op(r: Row) -> str:
    if r.suite == "layer":
        return "layer " + r.op[r.op.index("(") + 1:-1]
    return {"forward": "fwd", "forward+backward": "fwd+bwd", "fused backward": "fused bwd"}.get(r.op, r.op)


def draw_png(rows: list[Row], path: str) -> str | None:
    """Bar charts of time / dense per case (GMM, layer); returns why not when it cannot draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    panels = {}
    for r in rows:
        if r.ratio_to_dense is None or r.suite in ("cuda", "example") or r.dtype == "fp16":
            continue
        groups = panels.setdefault(r.suite, {})
        groups.setdefault((r.op, r.dtype, r.experts), []).append(r)
    if not panels:
        return "nothing to draw"
    impls = list(dict.fromkeys(r.impl for g in panels.values() for rs in g.values() for r in rs))
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4.2 * len(panels)), squeeze=False)
    for ax, (suite, groups) in zip(axes[:, 0], panels.items()):
        for j, rs in enumerate(groups.values()):
            width = 0.8 / len(rs)
            for i, r in enumerate(rs):
                ax.bar(j + (i - (len(rs) - 1) / 2) * width, r.ratio_to_dense, width, color=colors[r.impl],
                       label=r.impl)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{_short_op(rs[0])}\n{d} E={E}" for (_, d, E), rs in groups.items()], fontsize=7)
        ax.set_ylabel("time / dense GEMM time")
        ax.set_title(f"{suite}: lower is better", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------- CLI

def _csv(kind):
    def parse(s):
        items = [v.strip() for v in s.split(",") if v.strip()]
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gmm-plugin bench",
                                 description="Grouped-matmul benchmark against dense GEMM, a per-group loop, "
                                             "torch._grouped_mm and Megatron's experts.")
    ap.add_argument("--suite", type=_csv(str), default=["gmm", "layer", "cuda"],
                    help="comma list of gmm, layer, cuda (runs only when CUDA exists), example "
                         "(examples/pretrain_moe.py tokens/s, minutes) [gmm,layer,cuda]")
    ap.add_argument("--tokens", type=int, default=8192, help="GMM rows M [8192]")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size K [1024]")
    ap.add_argument("--ffn", type=int, default=2048, help="expert ffn size N [2048]")
    ap.add_argument("--experts", type=_csv(int), default=[8, 64], help="expert counts [8,64]")
    ap.add_argument("--dtypes", type=_csv(str), default=["fp32", "bf16", "fp16"], help="fp32,bf16,fp16")
    ap.add_argument("--layout", choices=("kn", "nk"), default="kn",
                    help="weight as [E,K,N] (kn) or a transposed [E,N,K] parameter (nk) [kn]")
    ap.add_argument("--layer-tokens", type=int, default=4096, help="MoE layer tokens [4096]")
    ap.add_argument("--topk", type=int, default=2, help="MoE layer router top-k [2]")
    ap.add_argument("--layer-grads", type=_csv(str), default=["plain", "main_grad"],
                    help="layer gradients: plain (.grad) and/or main_grad (fp32 buffers with Megatron DDP's "
                         "hook; the plugin fuses into them) [plain,main_grad]")
    ap.add_argument("--example-steps", type=int, default=40, help="training steps per example run [40]")
    ap.add_argument("--example-runs", type=int, default=2, help="example runs of each kind, alternating [2]")
    ap.add_argument("--example-config", metavar="PATH", help="example preset [configs/pretrain_tiny_cpu.yaml]")
    ap.add_argument("--example-threads", type=int, default=None,
                    help="train.cpu_threads for the example runs (0: torch's default) [the preset's]")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds; the minimum is reported [5]")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first [1]")
    ap.add_argument("--fp16-dense-rows", type=int, default=64,
                    help="rows the dense fp16 torch.mm is timed on before scaling to --tokens [64]")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes and one round (a smoke test, not a measurement)")
    ap.add_argument("--json", metavar="PATH", help="write machine, settings, rows and targets as JSON")
    ap.add_argument("--png", metavar="PATH", help="draw a bar chart of time / dense (needs matplotlib)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    return ap


def _apply_tiny(args) -> None:
    args.tokens, args.hidden, args.ffn = 64, 32, 48
    args.experts = [4] if args.experts == [8, 64] else args.experts
    args.layer_tokens = 32
    args.repeat, args.warmup, args.fp16_dense_rows = 1, 0, 8
    args.example_steps, args.example_runs = 3, 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPES] + [s for s in args.suite if s not in SUITES]
    if bad:
        print(f"gmm-plugin bench: unknown dtype or suite {bad[0]!r} (dtypes: fp32, bf16, fp16; "
              "suites: " + ", ".join(SUITES) + ")", file=sys.stderr)
        return 2
    if args.tiny:
        _apply_tiny(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
          + (f", {info['cuda_device']}" if "cuda_device" in info else "")
          + "; allocator: " + (" ".join(f"{k}={v}" for k, v in info["malloc_env"].items()) or "glibc defaults"))
    print(f"# GMM M={args.tokens} K={args.hidden} N={args.ffn}; min of {args.repeat} rounds"
          + ("; --tiny: a smoke test, the figures mean nothing" if args.tiny else ""))
    rows: list[Row] = []
    skipped = []
    if "gmm" in args.suite:
        rows += gmm_suite(args, torch.device("cpu"))
    if "cuda" in args.suite:
        if torch.cuda.is_available():  # the GMM suite again on the GPU, then the sync and overhead checks
            rows += gmm_suite(args, torch.device("cuda")) if "gmm" in args.suite else []
            rows += cuda_suite(args)
        else:
            skipped.append("cuda suite skipped: no CUDA device")
    if "layer" in args.suite:
        layer_rows, why = layer_suite(args)
        rows += layer_rows
        if why:
            skipped.append(f"layer suite skipped: {why}")
    if "example" in args.suite:
        ex_rows, why = example_suite(args)
        rows += ex_rows
        if why:
            skipped.append(f"example suite skipped: {why}")
    print(format_table(rows))
    targets = evaluate_targets(rows)
    if targets:
        print("\n# targets\n" + format_targets(targets))
    for s in skipped:
        print(f"# {s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": vars(args), "rows": [asdict(r) for r in rows],
                       "targets": [asdict(t) for t in targets], "skipped": skipped}, f, indent=1)
    if args.png:
        why = draw_png(rows, args.png)
        if why:
            print(f"# no chart: {why}")
    return 0



# ---------------------------------------------------------------------------------- layer suite

def _ensure_world() -> None:
    """A one-process gloo group and Megatron's parallel state (TP=EP=PP=1), unless there is one."""
    import tempfile

    import torch.distributed as dist
    from megatron.core import parallel_state
    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(prefix="gmm_bench_gloo_"), "store")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def _layer_config(args, experts, dtype, grouped):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    return TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, ffn_hidden_size=args.ffn,
        moe_ffn_hidden_size=args.ffn, num_moe_experts=experts, moe_router_topk=args.topk,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped, use_cpu_initialization=True,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
        gradient_accumulation_fusion=False, moe_aux_loss_coeff=0.0, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0, moe_permute_fusion=False)


def _build_moe_layer(config):
    import functools

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts,
                               moe_grouped_gemm=config.moe_grouped_gemm)
    layer = spec(config=config) if isinstance(spec, functools.partial) else build_module(spec, config=config)
    return layer


def _loop_gmm(a, b, batch_sizes, trans_b=False):
    """A per-expert torch.mm loop with grouped_gemm.ops.gmm's signature (the legacy GroupedMLP's
    kernel where the grouped_gemm package is missing, as it is on CPU)."""
    sizes = batch_sizes.tolist()
    ws = b.unbind(0)  # unbind: one stack in backward, not one full-size zero tensor per expert
    parts = [torch.mm(xe, ws[e].t() if trans_b else ws[e]) for e, xe in enumerate(torch.split(a, sizes))]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[-2 if trans_b else -1])


class _LegacyLoop:
    """Unpatched legacy GroupedMLP with _loop_gmm as grouped_gemm (megatron-core 0.12-0.16)."""

    def __enter__(self):
        from megatron.core.transformer.moe import grouped_gemm_util as gg
        from megatron.core.transformer.moe import moe_utils
        self.saved = [(gg, "ops", gg.__dict__.get("ops")), (gg, "grouped_gemm", gg.__dict__.get("grouped_gemm")),
                      (moe_utils, "te_general_gemm", moe_utils.__dict__.get("te_general_gemm", _MISSING))]
        gg.ops = argparse.Namespace(gmm=_loop_gmm)
        gg.grouped_gemm = gg.grouped_gemm or object()
        if "te_general_gemm" not in vars(moe_utils):  # 0.16 without TE: NameError in the router
            moe_utils.te_general_gemm = None
        return self

    def __exit__(self, *exc):
        for mod, name, value in self.saved:
            if value is _MISSING:
                delattr(mod, name)
            else:
                setattr(mod, name, value)


_MISSING = object()


def layer_suite(args) -> tuple[list[Row], str | None]:
    """Megatron MoELayer forward+backward: plugin vs SequentialMLP (vs legacy GroupedMLP)."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            import megatron.core  # noqa: F401

        import patches
        from patches import cpu_platform
    except ImportError as e:
        return [], f"needs megatron-core and the patches package ({e})"
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)  # Megatron: TE/Apex missing, deprecations
    shim_was_on = cpu_platform.is_enabled()
    cpu_platform.enable(force=True)  # the layer runs on the CPU, even where CUDA exists
    try:
        return _layer_rows(args, patches)
    finally:
        patches.revert()
        if not shim_was_on:  # torch.cuda back to itself for whatever runs next
            cpu_platform.disable()


def _layer_rows(args, patches) -> tuple[list[Row], str | None]:
    from gmm_plugin.config import load_config
    _ensure_world()
    legacy = patches.megatron_version()[:2] < (0, 17)
    cfg = load_config(None, env={}, overrides={"backend": "auto"})
    cfg_input = load_config(cfg, env={}, overrides={"fused_wgrad_dtype": "input"})
    rows = []
    T, H, F = args.layer_tokens, args.hidden, args.ffn
    routed = T * args.topk
    gemm_flops = 3 * 2.0 * routed * H * (2 * F + F)  # fc1 (GLU: 2F wide) + fc2, forward and 2 backward
    for dname in [d for d in args.dtypes if d != "fp16"]:
        dtype = DTYPES[dname]
        for E in args.experts:
            g = torch.Generator().manual_seed(args.seed)
            x = (torch.randn(T, 1, H, generator=g)).to(dtype)
            dy = (torch.randn(T, 1, H, generator=g) * 1e-2).to(dtype)
            torch.manual_seed(args.seed)
            patches.revert()
            seq = _build_moe_layer(_layer_config(args, E, dtype, grouped=False))
            patches.apply(cfg)
            plug = _build_moe_layer(_layer_config(args, E, dtype, grouped=True))
            patches.revert()
            variants = {"SequentialMLP": (seq, None, cfg), "gmm-plugin": (plug, "plugin", cfg)}
            if legacy and dtype == torch.bfloat16:
                with _LegacyLoop():
                    variants["legacy GroupedMLP (loop gmm)"] = (_build_moe_layer(
                        _layer_config(args, E, dtype, grouped=True)), "legacy", cfg)
            for layer, *_ in variants.values():  # same router weights: the same tokens per expert
                with torch.no_grad():
                    layer.router.weight.copy_(seq.router.weight)
            # dense reference: the layer's expert GEMMs as plain torch.mm at the same shapes
            a1, w1 = torch.randn(routed, H).to(dtype), torch.randn(H, 2 * F).to(dtype)
            a2, w2 = torch.randn(routed, F).to(dtype), torch.randn(F, H).to(dtype)
            g1, g2 = torch.randn(routed, 2 * F).to(dtype), torch.randn(routed, H).to(dtype)

            def dense():
                torch.mm(a1, w1), torch.mm(g1, w1.t()), torch.mm(a1.t(), g1)
                torch.mm(a2, w2), torch.mm(g2, w2.t()), torch.mm(a2.t(), g2)

            for grads in args.layer_grads:
                hooks = [h for layer, *_ in variants.values() for h in _ddp_style(layer)] \
                    if grads == "main_grad" else []
                cases = {"expert GEMMs as dense torch.mm": dense}
                for name, (layer, mode, layer_cfg) in variants.items():
                    cases[name] = _layer_step(layer, mode, x, dy, layer_cfg)
                if grads == "main_grad" and cfg.gemm_fusion and dtype != torch.float32:
                    cases[FUSED_INPUT_LAYER] = _layer_step(plug, "plugin", x, dy, cfg_input)
                samples = time_cases(cases, args.repeat, args.warmup, torch.device("cpu"))
                peaks = {n: peak_bytes(f, torch.device("cpu")) for n, f in cases.items()} if args.memory else {}
                patches.revert()
                for h in hooks:
                    h.remove()
                meta = dict(suite="layer", op=f"MoE layer fwd+bwd T={T} top{args.topk} ({_GRADS[grads]})",
                            dtype=dname, experts=E)
                fused = grads == "main_grad" and cfg.gemm_fusion
                rows += _rows_from(samples, gemm_flops, "expert GEMMs as dense torch.mm", meta, peaks,
                                   notes={"gmm-plugin": f"experts: {type(plug.experts).__name__}"
                                                        + (", gemm_fusion" if fused else "")})
    return rows, None


_GRADS = {"plain": ".grad", "main_grad": "fp32 main_grad"}


def _ddp_style(layer):
    """Give every parameter an fp32 main_grad and Megatron DDP's hook: a gradient that arrives in
    .grad is added to main_grad and dropped, unless the op already accumulated it there
    (grad_added_to_main_grad, set by gemm_fusion). Returns the hook handles."""
    def hook(p):
        if not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
        p.grad_added_to_main_grad = False
        p.grad = None

    handles = []
    for p in layer.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
        p.grad_added_to_main_grad = False
        handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


def _layer_step(layer, mode, x, dy, cfg):
    import patches

    def run():
        ctx = _LegacyLoop() if mode == "legacy" else _Nothing()
        if mode == "plugin":
            patches.apply(cfg)
        else:
            patches.revert()
        with ctx:
            xi = x.detach().requires_grad_(True)
            out, _ = layer(xi)
            out.backward(dy)
        layer.zero_grad(set_to_none=True)
    return run


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _layer_targets(rows) -> list[Target]:
    out = []
    for r in rows:
        if r.suite != "layer" or r.impl not in ("gmm-plugin", FUSED_INPUT_LAYER):
            continue
        seq = _find(rows, suite="layer", op=r.op, dtype=r.dtype, experts=r.experts, impl="SequentialMLP")
        speedup = seq.time_ms / r.time_ms
        grads = r.op[r.op.index("(") + 1:-1]
        how = ", fused_wgrad_dtype input" if r.impl == FUSED_INPUT_LAYER else ""
        name = f"MoE layer {r.dtype} E={r.experts} {grads}{how}"
        if r.experts <= 8:
            out.append(Target(f"{name}: no slower than SequentialMLP", f"{speedup:.3f}x SequentialMLP speed",
                              speedup >= 1.0))
        else:
            out.append(Target(f"{name}: >= 1.15x SequentialMLP", f"{speedup:.3f}x SequentialMLP speed",
                              speedup >= 1.15))
        out.append(Target(f"{name}: <= 1.25x its GEMMs at dense speed", f"{r.ratio_to_dense:.3f}x",
                          r.ratio_to_dense <= 1.25))
    return out


if __name__ == "__main__":
    sys.exit(main())
