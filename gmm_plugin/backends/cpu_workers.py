"""One single-threaded GEMM worker per core for the torch backend's grouped products on CPU.

Why: on CPU a grouped GEMM is a series of ordinary GEMMs, and with many experts most of them are
small (an expert gets about M/E rows). Each GEMM split across all cores by OpenMP synchronises
the cores at every block; giving each core its own contiguous share of the rows and a one-thread
GEMM keeps the cores busy with no barriers (docs/benchmarks.md has the measurements). The
calling thread waits. The products are the same GEMMs on sub-blocks, so results differ from a
whole-group GEMM at most by the kernel's blocking (rounding order), never by more.

Used only for real CPU tensors, outside autograd recording, autocast and dispatch modes, with
more than one intra-op thread, and for shapes where it measured faster (see the thresholds
below); otherwise the caller runs the usual multi-threaded path.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import torch_caps

# When the workers pay off (measured on the 2-core reference machine, docs/benchmarks.md): many
# small groups (a multi-threaded GEMM on ~100 rows is where OpenMP loses most) of big matrices,
# in a big enough product that the hand-off and the caller's spinning OpenMP threads do not show.
MIN_FLOPS = 1 << 31        # ~2.1 GFLOP for the whole grouped product
MAX_GROUP_ROWS = 512       # mean rows of a non-empty group; larger groups run well multi-threaded
MIN_GROUP_CELLS = 1 << 20  # elements of each group's weight (or weight-gradient) matrix
_local = threading.local()
_pool = None
_pool_lock = threading.Lock()


class _Workers:
    def __init__(self, n: int):
        self.size = n
        self.busy = threading.Lock()
        self._jobs = [queue.SimpleQueue() for _ in range(n)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        ready: queue.SimpleQueue = queue.SimpleQueue()
        caller_threads = torch.get_num_threads()
        for q in self._jobs:
            threading.Thread(target=self._loop, args=(q, ready), daemon=True, name="gmm-plugin-cpu").start()
        for _ in self._jobs:
            ready.get()
        # torch.set_num_threads also records a process-wide default that new threads pick up:
        # the workers' 1 must not leak, so put the caller's value back.
        torch.set_num_threads(caller_threads)

    def _loop(self, jobs: queue.SimpleQueue, ready: queue.SimpleQueue) -> None:
        _local.worker = True
        torch.get_num_threads()   # ATen's lazy per-thread init first, or it would undo the next line
        torch.set_num_threads(1)  # thread-local for OpenMP and MKL
        torch.set_grad_enabled(False)
        ready.put(None)
        while True:
            fn = jobs.get()
            error = None
            try:
                fn()
            except BaseException as e:  # handed to the caller, which re-raises it
                error = e
            fn = None  # before signalling: an idle worker must not keep the job's tensors alive
            self._done.put(error)
            error = None

    def run(self, fns) -> None:
        for q, fn in zip(self._jobs, fns):
            q.put(fn)
        errors = [self._done.get() for _ in fns]
        for e in errors:
            if e is not None:
                raise e


def _reset_after_fork() -> None:  # threads do not survive fork(); the child builds its own
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def usable_workers(flops: float, group_rows: float, group_cells: int, *tensors: torch.Tensor) -> int:
    """How many workers a grouped product may use (0: the caller runs it with the usual
    multi-threaded GEMMs). flops: the whole product; group_rows: the mean size of a non-empty
    group along the split axis; group_cells: the size of the matrix every group's GEMM streams
    (the expert weight, or the weight-gradient block)."""
    if flops < MIN_FLOPS or group_rows > MAX_GROUP_ROWS or group_cells < MIN_GROUP_CELLS \
            or getattr(_local, "worker", False):
        return 0
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or t.device.type != "cpu" or (grad and t.requires_grad):
            return 0
    # Autocast and dispatch/function modes are thread-local: the workers would not see them.
    if torch_caps.autocast_enabled("cpu") or _get_current_dispatch_mode() is not None \
            or torch._C._is_torch_function_mode_enabled():
        return 0
    n = min(torch.get_num_threads(), os.cpu_count() or 1)
    return n if n > 1 else 0


def run(pieces, do, workers: int) -> None:
    """Call do(piece) for every piece, on `workers` workers that each take the next piece as they
    finish the last one (so a core slowed down by another process just takes fewer pieces), and
    wait. Inline when the pool is in use by another thread."""
    global _pool
    pieces = list(pieces)
    workers = min(workers, len(pieces))
    if workers <= 1:
        for piece in pieces:
            do(piece)
        return
    with _pool_lock:
        if _pool is None or _pool.size < workers:
            _pool = _Workers(workers)
        pool = _pool
    if not pool.busy.acquire(blocking=False):  # another thread is using it: do the work inline
        for piece in pieces:
            do(piece)
        return
    order = itertools.count()  # next() on it is atomic under the GIL
    # Inference mode is thread-local: a worker writing into the caller's inference tensors must be
    # in it too (outside it, in-place updates of inference tensors are refused). Only then:
    # inference_mode(False) would turn the worker's grad mode back on.
    inference = torch.is_inference_mode_enabled()

    def worker():
        with torch.inference_mode() if inference else contextlib.nullcontext():
            for i in iter(lambda: next(order), None):
                if i >= len(pieces):
                    return
                do(pieces[i])

    try:
        pool.run([worker] * workers)
    finally:
        pool.busy.release()


def blocks(start: int, end: int, step: int):
    """[start, end) in consecutive ranges of at most `step`."""
    return [(lo, min(lo + step, end)) for lo in range(start, end, step)]


def block_size(total: int, workers: int, floor: int = 128) -> int:
    """Rows per piece: a few pieces per worker to balance, none so small that a GEMM slows down."""
    return max(floor, -(-total // (4 * workers)))
