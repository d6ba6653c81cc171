"""Helpers for the checkpoint tests: a multi-process gloo launcher, the flattening of a sharded
state dict into comparable records, and the megatron-core installations on this machine.

Imported by pytest (tests/patches on sys.path) and by the worker scripts it starts.
"""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MCORE_DIRS = (os.path.join(ROOT, ".mcore"), os.path.join(ROOT, ".mcore-extra"))


# ----------------------------------------------------------------------------------------------
# launching workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, nprocs: int, args=(), *, pythonpath=None, timeout=240.0) -> tuple[int, str]:
    """Run `script` on `nprocs` processes (RANK / WORLD_SIZE / MASTER_ADDR=127.0.0.1 / MASTER_PORT).

    pythonpath: folders put first on PYTHONPATH (default: the current PYTHONPATH), after the
    repository root. Returns (worst exit status, rank 0's stdout + every rank's stderr tail). A rank
    that fails makes the others be killed after a short grace period (they would wait in a
    collective); everything is killed at `timeout` seconds.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(nprocs), PYTHONWARNINGS="ignore")
    if pythonpath is None:
        pythonpath = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *pythonpath])
    procs = []
    for rank in range(nprocs):
        env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, script, *map(str, args)], env=env_r, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 15):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    outs = [p.communicate() for p in procs]
    codes = [p.returncode for p in procs]
    text = outs[0][0] + "".join(line + "\n" for out, _ in outs[1:] for line in out.splitlines()
                                if line.startswith("FAIL"))
    text += "".join(f"\n--- rank {r} stderr (exit {codes[r]}) ---\n{err[-3000:]}"
                    for r, (_, err) in enumerate(outs) if codes[r] != 0)
    if time.monotonic() > deadline:
        text += f"\n--- killed after {timeout:.0f} s ---"
    return max(abs(c) for c in codes), text


def init_worker():
    """In a worker: gloo (MASTER_ADDR=127.0.0.1 from launch) with a 90 s collective timeout."""
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    return dist.get_rank(), dist.get_world_size()


def run_cases(label: str, cases) -> int:
    """In a worker: each (case, problems) of the iterable, agreed over all ranks. Prints "OK label:
    case" on rank 0 when every rank passed it, "FAIL rank R label: case: problems" on each rank that
    did not (what launch() collects); returns the number of failed cases."""
    import torch
    import torch.distributed as dist
    rank, failures = dist.get_rank(), 0
    for case, problems in cases:
        bad = torch.tensor([len(problems)])
        dist.all_reduce(bad)
        failures += int(bad.item() > 0)
        if problems:
            print(f"FAIL rank {rank} {label}: {case}: {problems[:6]}", flush=True)
        elif rank == 0 and bad.item() == 0:
            print(f"OK {label}: {case}", flush=True)
    return failures


def finish_worker(failures: int) -> None:
    """In a worker: leave the process group together and exit 1 on any failure."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


# ----------------------------------------------------------------------------------------------
# sharded state dicts as comparable records


def sharded_records(sharded_state_dict):
    """Apply the factories, then one sorted record per ShardedTensor / ShardedObject:
    (kind, key, metadata..., data). Dict keys are not part of a checkpoint and are left out."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
    apply_factories(sharded_state_dict)
    records = []
    for v in nested_values(sharded_state_dict):
        if isinstance(v, ShardedTensor):
            records.append((("tensor", v.key, v.dtype, v.local_shape, v.global_shape, v.global_offset,
                             v.axis_fragmentations, v.replica_id, v.prepend_axis_num, v.flattened_range), v.data))
        elif isinstance(v, ShardedObject):
            records.append((("object", v.key, v.global_shape, v.global_offset, v.replica_id), v.data))
        else:
            raise AssertionError(f"unexpected entry in a sharded state dict: {v!r}")
    return sorted(records, key=lambda r: repr(r[0]))


def compare_records(got, want) -> list[str]:
    """Differences between two sharded_records lists (empty when they are the same)."""
    import torch
    problems = []
    got_meta, want_meta = [m for m, _ in got], [m for m, _ in want]
    if got_meta != want_meta:
        extra = [m for m in got_meta if m not in want_meta]
        missing = [m for m in want_meta if m not in got_meta]
        return [f"metadata differ: only ours {extra[:4]}, only SequentialMLP's {missing[:4]}"]
    for (meta, a), (_, b) in zip(got, want):
        if meta[0] == "tensor":
            if not torch.equal(a, b):
                problems.append(f"values differ for {meta[1]} at {meta[5]}")
        elif a != b:
            problems.append(f"object differs for {meta[1]} at {meta[3]}: {a!r} vs {b!r}")
    return problems


# ----------------------------------------------------------------------------------------------
# megatron-core installations


def _version_in(folder: str):
    from packaging.version import InvalidVersion, Version
    for info in glob.glob(os.path.join(folder, "megatron_core-*.dist-info")):
        try:
            release = Version(os.path.basename(info)[len("megatron_core-"):-len(".dist-info")]).release
        except InvalidVersion:
            continue
        return tuple((release + (0, 0, 0))[:3])
    return None


def installed_mcore() -> dict[tuple, list[str]]:
    """{version: PYTHONPATH folders} for every megatron-core found here: each .mcore/<v> and
    .mcore-extra/<v> folder, and the one in this interpreter's own site-packages (empty list)."""
    found = {}
    import site
    for sp in site.getsitepackages():
        v = _version_in(sp)
        if v:
            found.setdefault(v, [])
    extra = [d for d in glob.glob(os.path.join(ROOT, ".mcore-extra", "*")) if _version_in(d) is None]
    for base in MCORE_DIRS:
        for folder in sorted(glob.glob(os.path.join(base, "*"))):
            v = _version_in(folder)
            if v:
                found.setdefault(v, [folder, *extra])  # .mcore-extra/{psutil,triton} when present
    return found


def psutil_path() -> list[str] | None:
    """Folders that make `import psutil` work ([] when it is installed here), or None."""
    try:
        import psutil  # noqa: F401
        return []
    except ImportError:
        folder = os.path.join(ROOT, ".mcore-extra", "psutil")
        return [folder] if os.path.isdir(os.path.join(folder, "psutil")) else None


# ----------------------------------------------------------------------------------------------
# the worker runs the tests share (once per pytest process)

WORKER = os.path.join(HERE, "checkpoint_worker.py")
LAUNCH_TIMEOUT = 300.0
_RUNS: dict = {}


class Run:
    """One worker run: its exit status, output, and the OK / FAIL lines per phase."""

    def __init__(self, label, rc, output):
        self.label, self.rc, self.output = label, rc, output

    def ok(self, phase):
        return [line for line in self.output.splitlines() if line.startswith(f"OK {phase}: ")]

    def check(self, phase, expected_cases):
        """Assert that `phase` ran, every case passed on every rank, and there were expected_cases."""
        fails = [line for line in self.output.splitlines() if line.startswith("FAIL") and f" {phase}: " in line]
        ok = self.ok(phase)
        tail = self.output[-6000:]
        assert not fails, f"{self.label}:\n" + "\n".join(fails) + "\n" + tail
        assert len(ok) == expected_cases, f"{self.label}: {len(ok)} of {expected_cases} {phase} cases passed\n{tail}"


def legacy_mcore():
    """(version, PYTHONPATH folders) of the newest megatron-core 0.13-0.16 found here (0.12's
    torch_dist does not work with numpy 2 / torch 2.13), or None."""
    legacy = {v: p for v, p in installed_mcore().items() if (0, 13) <= v[:2] < (0, 17)}
    if not legacy:
        return None
    version = max(legacy)
    return version, legacy[version]


def worker_pythonpath(folders=None):
    """PYTHONPATH for a worker: the given megatron-core folders (default: this process's PYTHONPATH) + psutil."""
    if folders is None:
        folders = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [*folders, *(psutil_path() or [])]


def run_once(key, nprocs, phases, before=None) -> Run:
    """Run the worker once per pytest process for `key` (cached); `before(workdir)` may run first
    (the legacy writer) and return extra phases plus a note for the report."""
    import shutil
    import tempfile
    if key not in _RUNS:
        workdir = tempfile.mkdtemp(prefix="gmm_ckpt_")
        try:
            notes = ""
            if before is not None:
                extra, notes = before(workdir)
                phases = [*phases, *extra]
            rc, out = launch(WORKER, nprocs, [workdir, *phases], pythonpath=worker_pythonpath(),
                             timeout=LAUNCH_TIMEOUT)
            _RUNS[key] = Run(f"{nprocs} processes, phases {phases}", rc, notes + out)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return _RUNS[key]


def write_legacy_checkpoint(workdir):
    """The legacy writer (megatron-core 0.13-0.16 with the plugin's GroupedMLP) into workdir/legacy."""
    found = legacy_mcore()
    if found is None:
        return [], "no megatron-core 0.13-0.16 here: legacy_read not run\n"
    version, folders = found
    rc, out = launch(WORKER, 2, [workdir, "legacy_write"], pythonpath=worker_pythonpath(folders),
                     timeout=LAUNCH_TIMEOUT)
    note = f"--- legacy writer, megatron-core {'.'.join(map(str, version))} (exit {rc}) ---\n{out}\n"
    return (["legacy_read"] if rc == 0 else []), note


def two_process_run() -> Run:
    """The 2-process run both checkpoint test files read: layout (0.17+) and interchange, and on
    0.17+ the read of a checkpoint written first by megatron-core 0.13-0.16 (when one is here)."""
    import patches
    modern = patches.megatron_version()[:2] >= (0, 17)
    phases = (["layout"] if modern else []) + ["interchange"]
    return run_once("2 processes", 2, phases, before=write_legacy_checkpoint if modern else None)
