"""Robustness suite: prints and writes the summary (runs/robustness/summary.{json,md}) at the end."""
from __future__ import annotations

import robust_support


def pytest_terminal_summary(terminalreporter):
    if not robust_support.tally:
        return
    md, out = robust_support.write_summary()
    terminalreporter.write_sep("=", "gmm-plugin robustness summary")
    terminalreporter.write_line(md)
    terminalreporter.write_line(f"(written to {out}/summary.json and summary.md)")
