"""Entry point of the checkpoint tests' gloo processes (started by checkpoint_helpers.launch).

    checkpoint_worker.py WORKDIR PHASE [PHASE ...]      (phases: checkpoint_cases.PHASES)

Prints one "OK <phase>: <case>" line on rank 0 for every case that passed on all ranks and
"FAIL rank R <phase>: <case>: <problems>" for every rank where it did not; exits 1 on any failure.
This file imports nothing heavy at module level: torch_dist saving starts a multiprocessing
Manager with the 'spawn' method, which re-imports this script in a fresh interpreter.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]
    import torch
    import torch.distributed as dist

    import checkpoint_cases
    import checkpoint_helpers as ch
    import patches

    workdir, phases = sys.argv[1], sys.argv[2:]
    rank, _ = ch.init_worker()
    patches.apply({"backend": "torch"})  # the CPU shim (the phases re-apply it with their own settings)
    failures = 0
    try:
        for phase in phases:
            for case, problems in checkpoint_cases.PHASES[phase](workdir):
                bad = torch.tensor([len(problems)])
                dist.all_reduce(bad)
                failures += int(bad.item() > 0)
                if problems:
                    print(f"FAIL rank {rank} {phase}: {case}: {problems[:6]}", flush=True)
                elif rank == 0 and bad.item() == 0:
                    print(f"OK {phase}: {case}", flush=True)
    finally:
        patches.revert()
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
