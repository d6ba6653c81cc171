"""`main()`: run the chosen suites, print the table and the targets, write JSON and PNG."""
from __future__ import annotations

import torch

from .chart import draw_png
from .cuda_checks import cuda_suite
from .example_suite import example_suite
from .layer_suite import layer_suite
from .measure import Row
from .ops_suite import gmm_suite
from .options import parse_args
from .report import format_peak_rss, format_table, format_targets, header, machine_info, peak_rss_mb, write_json
from .targets import evaluate_targets


def run_suites(args) -> tuple[list[Row], list[str]]:
    """Rows of every suite asked for, and a line for each that could not run here."""
    rows: list[Row] = []
    skipped: list[str] = []
    if "gmm" in args.suite:
        rows += gmm_suite(args, torch.device("cpu"))
    if "cuda" in args.suite:  # before the layer suite, whose CPU shim patches torch.cuda while it runs
        if torch.cuda.is_available():  # the GMM suite again on the GPU, then the sync and overhead checks
            rows += gmm_suite(args, torch.device("cuda")) if "gmm" in args.suite else []
            rows += cuda_suite(args)
        else:
            skipped.append("cuda suite skipped: no CUDA device")
    for name, suite in (("layer", layer_suite), ("example", example_suite)):
        if name in args.suite:
            new, why = suite(args)
            rows += new
            if why:
                skipped.append(f"{name} suite skipped: {why}")
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(header(info, args), flush=True)
    rows, skipped = run_suites(args)
    print(format_table(rows))
    targets = evaluate_targets(rows)
    if targets:
        print("\n# targets\n" + format_targets(targets))
    for line in skipped:
        print(f"# {line}")
    print(format_peak_rss(peak_rss_mb()))
    if args.json:
        write_json(args.json, info, args, rows, targets, skipped)
    if args.png:
        why = draw_png(rows, args.png)
        if why:
            print(f"# no chart: {why}")
    return 0
