"""The pretraining example (examples/pretrain_moe.py, Megatron-core MoE with gmm-plugin experts):

* determinism: two runs with the same seed log bitwise-identical losses, lr, grad norms and
  routing;
* interruption: SIGKILLed at random points (while starting, in the middle of a checkpoint write,
  between the write and the rename, at a random moment between steps), each restart with --resume
  continues from the last complete checkpoint, and the whole loss curve equals the uninterrupted
  run's, bit for bit. The kill between the write and the rename comes from
  tests/examples/pretrain_faults.py (the example has no fault switches); the others from outside.

Tiny preset, 10 steps, a checkpoint every step (so kills land in writes often).
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from robust_support import ROOT, count, expect, summary_dir

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.slow]

EXAMPLE = os.path.join(ROOT, "examples", "pretrain_moe.py")
FAULTS = os.path.join(ROOT, "tests", "examples", "pretrain_faults.py")  # the example with a fault injected
STEPS = 10
PRESET = """\
model: {num_layers: 1, hidden_size: 32, num_attention_heads: 2, num_experts: 4, moe_router_topk: 2,
        moe_ffn_hidden_size: 32, seq_length: 32}
train: {steps: %d, micro_batch_size: 2, global_batch_size: 4, warmup_steps: 1, seed: 4321}
data: {max_bytes: 50000, cache_dir: %s}
output: {save_interval: 1, log_interval: 1, plot: false, keep_checkpoints: 2}
gmm_plugin: {gemm_fusion: true}
"""


@pytest.fixture(scope="module")
def workdir():
    """Under the summary folder (runs/robustness/pretrain), so the logs stay for a post-mortem."""
    d = pathlib.Path(summary_dir()) / "pretrain"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "tiny.yaml").write_text(PRESET % (STEPS, d / "data"))
    return d


def start(workdir, out, *extra, faults=None):
    log = open(f"{out}.log", "a")
    script = [EXAMPLE] if faults is None else [FAULTS, faults]
    cmd = [sys.executable, *script, "--config", str(workdir / "tiny.yaml"), "--out-dir", str(out),
           "--use-gmm-plugin", "--device", "cpu", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MASTER_ADDR", None)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def finish(proc, out, timeout=400):
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"{out}: exit {rc}\n" + open(f"{out}.log").read()[-3000:]


def metrics(out):
    rows = []
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut short by a kill
                pass
    return rows


def curve(out):
    """What must match bit for bit: every step's loss, lr, grad norm and routing digest (JSON
    floats round-trip)."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["routing"]) for r in metrics(out)]


def latest(out):
    try:
        name = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    except FileNotFoundError:
        return 0
    assert os.path.isfile(os.path.join(out, "checkpoints", name, "rank_00000.pt")), f"latest names {name}: missing"
    return int(name.split("_")[1])


@pytest.fixture(scope="module")
def reference(workdir):
    """Two uninterrupted runs, same seed, in parallel (the data cache is built first by one)."""
    outs = [workdir / "ref_a", workdir / "ref_b"]
    first = start(workdir, outs[0])
    time.sleep(0.5)
    with ThreadPoolExecutor(1) as pool:  # the second waits for the shared data cache to exist
        second = pool.submit(lambda: (_wait_for(workdir / "data"), finish(start(workdir, outs[1]), outs[1])))
        finish(first, outs[0])
        second.result()
    return outs


def _wait_for(path, timeout=300):
    end = time.time() + timeout
    while not os.path.exists(path) and time.time() < end:
        time.sleep(0.2)


def test_same_seed_gives_bitwise_identical_losses(reference):
    a, b = (curve(o) for o in reference)
    count("determinism_repeats")
    expect(len(a) == STEPS and a == b, f"two runs with the same seed differ:\n{a}\n{b}")
    expect(len({row[1] for row in a}) > 1, "the loss does not change: the comparison means nothing")


def kill_when(proc, predicate, timeout=400):
    """SIGKILL proc as soon as predicate() holds (polled every ms); False if it exited first."""
    end = time.time() + timeout
    while proc.poll() is None and time.time() < end:
        if predicate():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    assert proc.poll() is not None, "the example hung"
    return False


def writing_checkpoint(out, pid):
    """A temporary checkpoint file of process pid exists (names end in .tmp<pid>; files a killed
    run left behind have another pid)."""
    for root, _, files in os.walk(os.path.join(out, "checkpoints")):
        if any(f.endswith(f".tmp{pid}") for f in files):
            return True
    return False


def test_sigkill_at_random_points_resumes_from_last_complete_checkpoint(workdir, reference):
    rng = random.Random(int(os.environ.get("GMM_ROBUSTNESS_SEED", "0")))
    out = workdir / "killed"
    log = f"{out}.log"
    kills = []  # (how, last complete checkpoint at the kill)

    def resumed_step(since):
        text = open(log).read()[since:]
        m = re.search(r"resumed from .* \(step (\d+)\)", text)
        return int(m.group(1)) if m else (0 if "no checkpoint" in text else None)

    def check_resume(since):
        """The run that just started resumed from the last complete checkpoint of the last kill."""
        got, want = resumed_step(since), kills[-1][1]
        expect(got == want, f"after a kill '{kills[-1][0]}' the run resumed from step {got}, but the last "
                            f"complete checkpoint was step {want}\n{open(log).read()[since:][-2000:]}",
               key="checkpoints_lost")
        count("kills_survived")

    def attempt(kind, predicate=None, faults=None):
        """Start (with --resume after a kill), SIGKILL when predicate() names a reason (or let the
        injected fault kill it), and record the last complete checkpoint at that moment."""
        since = os.path.getsize(log) if os.path.exists(log) else 0
        proc = start(workdir, out, *(["--resume"] if kills else []), faults=faults)
        t0, reason = time.time(), []
        if predicate:
            killed = kill_when(proc, lambda: reason.append(predicate(t0, proc.pid)) or reason[-1])
        else:
            killed = proc.wait(timeout=400) == -signal.SIGKILL
            assert not killed or "pretrain_faults: SIGKILL" in open(log).read()[since:], \
                f"{kind}: killed, but not by the injected fault\n{open(log).read()[since:][-3000:]}"
        if not killed:  # it ended on its own: only a clean finish is acceptable
            assert proc.returncode == 0, f"{kind}: exit {proc.returncode}\n{open(log).read()[since:][-3000:]}"
        if kills:
            check_resume(since)
        if killed:
            kind = reason[-1] if reason and isinstance(reason[-1], str) else kind
            kills.append((kind, latest(out)))
            count(f"kill: {kind}")

    # 1. at a random moment while starting up, at the latest when the first step is logged
    delay = rng.uniform(1.0, 12.0)
    attempt("at a random moment of start-up", lambda t0, pid: time.time() - t0 > delay or len(metrics(out)) >= 1)
    # 2. in the middle of a checkpoint write (a .tmp file exists: torch.save or `latest` in flight);
    #    should polling miss every write, three steps in (then it is a kill between steps)
    base2 = len(metrics(out))
    attempt("mid checkpoint write", lambda t0, pid: "mid checkpoint write" if writing_checkpoint(out, pid) else
            "between steps" if len(metrics(out)) >= base2 + 3 else None)
    # 3. after the checkpoint data is written and fsync'ed, before its rename (pretrain_faults.py)
    step = min(latest(out) + rng.randint(1, 2), STEPS - 2)
    attempt("between checkpoint write and rename", faults=f"in-save:{step}")
    # 4. at a random moment (0-0.3 s) after 1 or 2 new steps
    rows, pause, base, seen = rng.randint(1, 2), rng.uniform(0.0, 0.3), len(metrics(out)), {}

    def after_rows(t0, pid):
        if len(metrics(out)) >= base + rows:
            seen.setdefault("t", time.time())
        return "t" in seen and time.time() - seen["t"] >= pause
    attempt("at a random moment between steps", after_rows)
    # 5. to the end
    since = os.path.getsize(log)
    finish(start(workdir, out, "--resume"), out)
    check_resume(since)
    print("kills (how, last complete checkpoint):", kills)
    expect(len(kills) >= 3, f"too few kills landed: {kills}")
    ref = curve(reference[0])
    expect(curve(out) == ref, f"the interrupted run's curve differs from the uninterrupted one:\n"
                              f"{curve(out)}\n{ref}")
