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
    import checkpoint_cases
    import checkpoint_helpers as ch
    import patches

    workdir, phases = sys.argv[1], sys.argv[2:]
    ch.init_worker()
    patches.apply({"backend": "torch"})  # the CPU shim (the phases re-apply it with their own settings)
    try:
        failures = sum(ch.run_cases(phase, checkpoint_cases.PHASES[phase](workdir)) for phase in phases)
    finally:
        patches.revert()
    ch.finish_worker(failures)


if __name__ == "__main__":
    main()
