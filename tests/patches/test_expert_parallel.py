"""Expert parallelism 2 over gloo, 2 CPU processes started by torch.distributed's own launcher,
against expert parallelism 1 (see ep_worker.py for what is compared)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ep_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))


def test_ep2_matches_ep1_over_gloo():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    paths = [ROOT] + [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", WORKER]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    ok = [line for line in proc.stdout.splitlines() if line.startswith("OK EP2==EP1")]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(ok) == 4, proc.stdout
