"""What a run prints and writes: the header, the table of rows, the targets, and the JSON file."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict

import torch

from .. import settings
from . import measure
from .measure import Row
from .targets import Target


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
    # allocator settings that decide whether big freed buffers are kept (see docs/benchmarks.md)
    info["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))
                          or k in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")}
    return info


def header(info: dict, args) -> str:
    allocator = " ".join(f"{k}={v}" for k, v in info["malloc_env"].items()) or "glibc defaults"
    gpu = f", {info['cuda_device']}" if "cuda_device" in info else ""
    return "\n".join([
        f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
        f"{gpu}; allocator: {allocator}",
        f"# settings: {settings.current()}",
        f"# GMM M={args.tokens} K={args.hidden} N={args.ffn}; min of {args.repeat} rounds"
        + ("; --tiny: a smoke test, the figures mean nothing" if args.tiny else "")])


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    """One line a row, a blank line between blocks (suite, op, dtype, experts)."""
    head = ("suite", "op", "dtype", "E", "impl", "time ms", "GFLOP/s", "x dense", "peak MB", "note")
    left = {0, 1, 2, 4, 9}
    body = [(r.suite, r.op, r.dtype, str(r.experts), r.impl, _cell(r.time_ms, ".2f"), _cell(r.gflops, ".1f"),
             _cell(r.ratio_to_dense, ".3f"), _cell(r.peak_mb, ".1f"), r.note) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(head), line(["-" * w for w in widths])]
    last = None
    for cells, r in zip(body, rows):
        key = (r.suite, r.op, r.dtype, r.experts)
        if last is not None and key != last:
            lines.append("")
        lines.append(line(cells))
        last = key
    return "\n".join(lines)


def format_targets(targets: list[Target]) -> str:
    word = {True: "met", False: "NOT met", None: "not measured"}
    w = max((len(t.name) for t in targets), default=0)
    return "\n".join(f"{t.name.ljust(w)}  {t.measured:<34} {word[t.met]}" for t in targets)


def peak_rss_mb() -> dict:
    """This process's peak resident memory, in MB. Not its children's: Linux gives a child the
    high-water mark of the memory it was forked from, so every child (the example suite's runs,
    torch inductor's compile checks) would read as at least the parent's size when it started."""
    return {"process": round(measure.process_peak_kb() / 1024, 1)}


def format_peak_rss(peak: dict) -> str:
    return f"# peak RSS: {peak['process']:.0f} MB (this process)"


def write_json(path: str, info: dict, args, rows: list[Row], targets: list[Target], skipped: list[str]) -> None:
    data = {"machine": info, "options": vars(args), "gmm_settings": asdict(settings.current()),
            "rows": [asdict(r) for r in rows], "targets": [asdict(t) for t in targets], "skipped": skipped,
            "peak_rss_mb": peak_rss_mb()}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
