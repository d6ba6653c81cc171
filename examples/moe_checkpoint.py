"""Crash-safe checkpoints for the MoE pretraining example.

Layout under CKPT_DIR:
    step_000050/rank_00000.pt   one file per rank (expert-parallel ranks hold different experts)
    latest                      text: the name of the newest *complete* checkpoint

Every file is written to a temporary name, fsync'ed and renamed into place (os.replace is atomic),
and `latest` is only moved after every rank's file is in place (a barrier). A process killed at
any point, even in the middle of a write, therefore leaves `latest` naming a whole checkpoint; the
leftover temporary files are ignored and cleaned up by the next run.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

LATEST = "latest"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rename_into_place(tmp: str, path: str) -> None:
    """The moment a written, fsync'ed file becomes `path` (the tests kill the process just before)."""
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    rename_into_place(tmp, path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(ckpt_dir: str, step: int, rank: int) -> str:
    return os.path.join(ckpt_dir, step_dir_name(step), f"rank_{rank:05d}.pt")


def latest_step(ckpt_dir: str) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    try:
        with open(os.path.join(ckpt_dir, LATEST), encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    m = _STEP_DIR.match(name)
    if m is None or not os.path.isdir(os.path.join(ckpt_dir, name)):
        raise RuntimeError(f"{os.path.join(ckpt_dir, LATEST)}: names {name!r}, which is not a checkpoint; "
                           "delete the checkpoint folder or pass another --out-dir")
    return int(m.group(1))


def save(ckpt_dir: str, step: int, rank: int, state: dict, *, barrier, keep: int = 2,
         meta: dict | None = None) -> None:
    """Every rank calls this; barrier() must synchronize all ranks (a no-op for one process).

    meta (rank 0's): a small JSON description (the run's config), readable without torch.
    """
    path = rank_file(ckpt_dir, step, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_torch_save(state, path)
    barrier()  # every rank's file is in place before `latest` moves
    if rank == 0:
        if meta is not None:
            atomic_write_bytes(os.path.join(ckpt_dir, step_dir_name(step), META), json.dumps(meta, indent=1).encode())
        atomic_write_bytes(os.path.join(ckpt_dir, LATEST), (step_dir_name(step) + "\n").encode())
        _prune(ckpt_dir, keep)
    barrier()


def load(ckpt_dir: str, step: int, rank: int) -> dict:
    path = rank_file(ckpt_dir, step, rank)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path}: missing; was the checkpoint written by a run with another "
                           "number of processes?")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_meta(ckpt_dir: str, step: int) -> dict:
    with open(os.path.join(ckpt_dir, step_dir_name(step), META), encoding="utf-8") as f:
        return json.load(f)


def _prune(ckpt_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop any newer than `latest` (a run that died
    before `latest` moved) and all of them when there is no `latest`."""
    newest = latest_step(ckpt_dir)
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(ckpt_dir)) if m)
    complete = [s for s in steps if newest is not None and s <= newest]
    drop = complete[:-max(keep, 1)] + [s for s in steps if newest is None or s > newest]
    for s in drop:
        shutil.rmtree(os.path.join(ckpt_dir, step_dir_name(s)), ignore_errors=True)


def clean_partial(ckpt_dir: str) -> None:
    """Drop what a killed run left behind: temporary files and checkpoints newer than `latest`."""
    if not os.path.isdir(ckpt_dir):
        return
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            if ".tmp" in name:
                os.remove(os.path.join(root, name))
    _prune(ckpt_dir, keep=1 << 30)
