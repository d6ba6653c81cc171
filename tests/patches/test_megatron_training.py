"""Megatron's real training loop (megatron.training.pretrain) on a CPU with the plugin: 2 processes
over gloo, expert parallelism 2, a torch_dist checkpoint, and a resumed run whose losses equal the
uninterrupted run's bit for bit with dropout on (reference/megatron-lm-cpu.md, "Checkpoints").

Needs megatron.training: megatron-core 0.19's wheel ships it (.mcore/0.19.2 in tools/run_tests.py),
the 0.12 / 0.16 wheels do not (skipped there). Every subprocess has a timeout: a torch_dist save
without psutil hangs (reference row 9), and a hang must fail, not stall CI.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from patches import cpu_platform

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                       or importlib.util.find_spec("megatron.training") is None,
                       reason="megatron.training is not installed (megatron-core < 0.19 wheels ship only megatron/core)"),
    pytest.mark.skipif(cpu_platform.accelerator_present(), reason="the CPU training shim stays off with an accelerator"),
]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_training_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))
TIMEOUT_S = 300  # one run takes ~40 s on 2 busy cores

ITERS, SAVE_AT = 8, 4
FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
    "--seq-length", "32", "--max-position-embeddings", "32", "--position-embedding-type", "rope",
    "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
    "--hidden-dropout", "0.1", "--attention-dropout", "0.1",  # dropout on: the resume must keep its stream
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
    "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
    "--expert-model-parallel-size", "2",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--lr-decay-iters", str(ITERS), "--seed", "1234",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-workers", "0",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--no-masked-softmax-fusion",
    "--ckpt-format", "torch_dist", "--save-interval", str(SAVE_AT),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp_path, name, *flags):
    """Run the worker on 2 ranks; return {rank: [(iteration, loss hex), ...]} and the output."""
    out = str(tmp_path / f"{name}.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    paths = [ROOT] + [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), WORKER, out, *FLAGS, *flags]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{name}: no result within {TIMEOUT_S} s (a torch_dist save hangs without psutil)\n"
                    f"{(e.stdout or b'')[-3000:]!r}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed:\n{log[-6000:]}"
    losses = {}
    for rank in (0, 1):
        with open(f"{out}.rank{rank}") as f:
            losses[rank] = [tuple(x) for x in json.load(f)]
    return losses, log


def _after(losses, iteration):
    return {rank: [x for x in seq if x[0] >= iteration] for rank, seq in losses.items()}


@pytest.mark.parametrize("plugin", [
    pytest.param(True, id="gmm-plugin", marks=pytest.mark.skipif(
        importlib.util.find_spec("patches.expert_checkpoint") is None,
        reason="GmmGroupedMLP's torch_dist checkpoint (sharded_state_dict) comes with patches/expert_checkpoint.py")),
    pytest.param(False, id="megatron-experts"),
])
def test_pretrain_resume_from_torch_dist_is_bit_exact_with_dropout(tmp_path, plugin):
    ckpt = tmp_path / "ckpt"
    experts = ["--moe-grouped-gemm", "--gmm-plugin"] if plugin else []
    full, log = _train(tmp_path, "full", "--save", str(ckpt), *experts)
    assert re.search(r"hidden_dropout \.+ 0\.1", log) and "in torch_dist format" in log and "successfully saved checkpoint from iteration" in log, log[-4000:]
    if plugin:
        assert "experts: GmmGroupedMLP" in log or "experts: legacy GroupedMLP" in log, log[-4000:]
    micro_batches = ITERS * 8 // (2 * 2)  # per rank: global batch / (micro batch x data-parallel ranks)
    assert all(len(seq) == micro_batches for seq in full.values()), full

    # Resume from the checkpoint of iteration SAVE_AT (the run also saved at ITERS).
    (ckpt / "latest_checkpointed_iteration.txt").write_text(str(SAVE_AT))
    resumed, log = _train(tmp_path, "resumed", "--load", str(ckpt), *experts)
    assert f"at iteration {SAVE_AT}" in log and "loading distributed checkpoint" in log, log[-4000:]
    assert {r: [x[0] for x in seq] for r, seq in resumed.items()} == \
        {r: [x[0] for x in seq] for r, seq in _after(full, SAVE_AT).items()}  # iterations 4..7 (0-based)
    assert resumed == _after(full, SAVE_AT), "the resumed run's losses differ from the uninterrupted run's"
