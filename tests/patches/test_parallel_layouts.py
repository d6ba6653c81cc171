"""Parallel semantics of the plugin's experts against Megatron's own, layout by layout: TP x expert
TP x EP on 2 and 4 gloo processes (one launch per world size, every layout in it; see
parallel_layouts_worker.py for what is compared: outputs, main_grad after Megatron DDP's sync,
the allreduce / TP attributes with and without perform_initialization, the sharded state dict)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import checkpoint_helpers as ch  # noqa: E402
from parallel_layouts_worker import LAYOUTS, layout_name  # noqa: E402

WORKER = os.path.join(ch.HERE, "parallel_layouts_worker.py")
TIMEOUT = 240.0  # measured 12-40 s per launch on 2 cores (2 min with the machine loaded 8x); a hang fails
_RUNS: dict = {}


def _run(nprocs) -> ch.Run:
    if nprocs not in _RUNS:
        rc, out = ch.launch(WORKER, nprocs, pythonpath=ch.worker_pythonpath(), timeout=TIMEOUT)
        _RUNS[nprocs] = ch.Run(f"{nprocs} processes", rc, out)
    return _RUNS[nprocs]


CASES = [pytest.param(n, layout, id=f"{n}procs-{layout_name(layout, n)}") for n in (2, 4) for layout in LAYOUTS[n]]


@pytest.mark.parametrize("nprocs,layout", CASES)
def test_layout_matches_megatron(nprocs, layout):
    run = _run(nprocs)
    name = layout_name(layout, nprocs)
    fails = [line for line in run.output.splitlines() if line.startswith("FAIL") and f" {name} " in line]
    ok = [line for line in run.ok("layouts") if line.split(": ", 1)[1].startswith(name + " ")]
    assert not fails, "\n".join(fails) + "\n" + run.output[-4000:]
    assert len(ok) == 2, f"{run.label}: {len(ok)} of 2 cases (glu on/off) passed for {name}\n{run.output[-6000:]}"


def test_every_rank_finished():
    for n in (2, 4):
        run = _run(n)
        assert run.rc == 0, run.output[-6000:]
