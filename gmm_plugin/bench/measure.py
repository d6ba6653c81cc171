"""Timing and peak memory of a group of cases, and the rows they become.

Timing: every case of a group runs once per round, the rounds rotate the order, and the figure
is the minimum over the rounds; ratios compare cases timed in the same process and rounds.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .cases import MB


@dataclass
class Row:
    suite: str
    op: str
    dtype: str
    experts: int
    impl: str
    time_ms: float | None
    gflops: float | None = None
    ratio_to_dense: float | None = None   # time / the block's baseline time
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


def measure(cases: dict, args, device: torch.device, min_warmup: int = 0) -> tuple[dict, dict]:
    """Samples of every case, and each one's peak memory unless --no-memory; at least
    min_warmup untimed rounds first."""
    samples = time_cases(cases, args.repeat, max(args.warmup, min_warmup), device)
    peaks = {n: peak_bytes(f, device) for n, f in cases.items()} if args.memory else {}
    return samples, peaks


def rows_from(samples: dict, flops: float, baseline: str, meta: dict, peaks: dict,
              notes: dict | None = None, extra: dict | None = None) -> list[Row]:
    """One Row per case: its minimum time, GFLOP/s for `flops`, and time / the baseline's."""
    base = min(samples[baseline])
    out = []
    for name, s in samples.items():
        t = min(s)
        peak = peaks.get(name)
        out.append(Row(**meta, impl=name, time_ms=round(t, 3), gflops=round(flops / t / 1e6, 1),
                       ratio_to_dense=round(t / base, 4), note=(notes or {}).get(name, ""),
                       peak_mb=None if peak is None else round(peak / MB, 2),
                       samples_ms=[round(v, 3) for v in s], extra=dict(extra or {})))
    return out


def paired_speedup(base: Row, row: Row) -> float:
    """How many times faster row is than base: the median over rounds of base's time / row's
    time in the same round (the cases of a round run back to back, so a machine whose speed
    drifts between rounds slows both sides of a pair alike), or the ratio of the best times
    where the rounds do not pair up."""
    a, b = base.samples_ms, row.samples_ms
    if len(a) != len(b) or len(a) < 2 or not all(b):
        return base.time_ms / row.time_ms
    return statistics.median(x / y for x, y in zip(a, b))


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


def release_freed_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel (malloc_trim; nothing
    elsewhere). Under the CPU shim glibc keeps freed memory for reuse and trims only the top of
    its heap, so without this the heap a case grew stays resident for every case after it."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# The highest VmHWM seen before _rss_peak reset it: the kernel's own peak (VmHWM, and ru_maxrss,
# which reads the same counter) restarts at every reset, so the process's peak is kept here.
_peak_before_resets_kb = 0


def process_peak_kb() -> int:
    """This process's peak resident set so far, in KiB, across the resets of _rss_peak."""
    import resource
    try:
        now = _status_kb("VmHWM")
    except (OSError, ValueError):
        now = 0
    return max(_peak_before_resets_kb, now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _rss_peak(fn) -> int:
    global _peak_before_resets_kb
    release_freed_memory()
    start = _status_kb("VmRSS")
    _peak_before_resets_kb = max(_peak_before_resets_kb, _status_kb("VmHWM"))
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
