"""Runs examples/pretrain_moe.py with faults injected from outside, for the tests.

    python tests/examples/pretrain_faults.py FAULT[,FAULT...] [pretrain_moe.py arguments]

FAULT is one of
    after-step:N   SIGKILL once step N's metrics row is written, before that step's checkpoint;
                   the process that writes the metrics (rank 0) dies, and under
                   torch.distributed.run the launcher then stops the other ranks
    in-save:N      SIGKILL while the step-N checkpoint is saved: this rank's file is written and
                   fsync'ed but not yet renamed into place
    wrong-expert   a defective plugin: in every expert GEMM, the first token of expert 1's group
                   goes through expert 0's weight (an off-by-one group boundary), forward and
                   backward; for checking that the tests comparing runs catch a wrong expert

The example itself has no fault switches: this script imports it, replaces the function at the
chosen point (moe_metrics.MetricsLog.write, moe_checkpoint.rename_into_place,
patches.experts.grouped_linear), then runs its main() in this process. Before a SIGKILL it
prints one line `pretrain_faults: SIGKILL ...` to stderr, so a test can tell its kill from a crash.
"""
from __future__ import annotations

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _p in (os.path.join(ROOT, "examples"), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import moe_checkpoint  # noqa: E402
import moe_metrics  # noqa: E402
import pretrain_moe  # noqa: E402

MARK = "pretrain_faults: SIGKILL"


def die(where: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"{MARK} {where}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int) -> None:
    write = moe_metrics.MetricsLog.write

    def write_then_die(self, row):
        write(self, row)
        if row["step"] == step:
            die(f"after step {step}")

    moe_metrics.MetricsLog.write = write_then_die


def kill_in_save(step: int) -> None:
    rename = moe_checkpoint.rename_into_place
    step_dir = moe_checkpoint.step_dir_name(step)

    def die_before_rename(tmp, path):
        if os.path.basename(os.path.dirname(path)) == step_dir and os.path.basename(path).startswith("rank_"):
            die(f"in the step-{step} checkpoint write, before {path} is renamed into place")
        rename(tmp, path)

    moe_checkpoint.rename_into_place = die_before_rename


def wrong_expert() -> None:
    import torch

    from patches import experts

    right = experts.grouped_linear

    def off_by_one(x, weight, tokens_per_expert, *args, **kwargs):
        y = right(x, weight, tokens_per_expert, *args, **kwargs)
        counts = tokens_per_expert.tolist()
        if len(counts) < 2 or counts[1] == 0:
            return y
        row = torch.tensor([counts[0]], device=x.device)  # the first row of expert 1's group
        return y.index_copy(0, row, x.index_select(0, row) @ weight[0])

    experts.grouped_linear = off_by_one


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        sys.stderr.write(__doc__)
        return 2
    for fault in argv[0].split(","):
        kind, _, step = fault.partition(":")
        if kind == "after-step":
            kill_after_step(int(step))
        elif kind == "in-save":
            kill_in_save(int(step))
        elif kind == "wrong-expert" and not step:
            wrong_expert()
        else:
            sys.stderr.write(f"pretrain_faults.py: unknown fault {fault!r}\n{__doc__}")
            return 2
    return pretrain_moe.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
