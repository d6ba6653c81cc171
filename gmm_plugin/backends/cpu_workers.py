"""One single-threaded GEMM worker per core for the torch backend's grouped products on CPU.

Why: on CPU a grouped GEMM is a series of ordinary GEMMs, and with many experts most of them are
small (an expert gets about M/E rows). Each GEMM split across all cores by OpenMP synchronises
the cores at every block; giving each core its own contiguous share of the rows and a one-thread
GEMM keeps the cores busy with no barriers (docs/benchmarks.md has the measurements). The
calling thread waits. The products are the same GEMMs on sub-blocks, so results differ from a
whole-group GEMM at most by the kernel's blocking (rounding order), never by more.

Used only for real CPU tensors, outside autograd recording, autocast, dispatch modes and torch
function modes (but those that declare they change none of the workers' calls), with more than
one intra-op thread, and for shapes where it measured faster (see the thresholds
below); otherwise the caller runs the usual multi-threaded path.
"""
from __future__ import annotations

import atexit
import contextlib
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


class _Call:
    """One run() on the pool: its pieces, handed out one at a time, and who is still working on them.

    Everything a worker does for a call is tracked here, not in a queue shared between calls: a
    caller whose wait is interrupted (an exception from a signal handler, KeyboardInterrupt) stops
    the call and waits until no worker is inside one of its pieces before it raises, so no piece of
    an abandoned call can write into tensors after run() has left, and no late completion can be
    taken for another call's. A job that a worker picks up after the call stopped does nothing.
    """

    def __init__(self, pieces, do, inference: bool):
        self.pieces, self.do, self.inference = pieces, do, inference
        # An RLock: were a second interrupt to land while the waiting caller takes it back, the
        # caller's release fails loudly instead of releasing a worker's hold.
        self.cond = threading.Condition(threading.RLock())
        self.next = 0        # the next piece to hand out
        self.running = 0     # workers inside work()
        self.stopped = False
        self.errors: list[BaseException] = []

    def _take(self):
        with self.cond:
            if self.stopped or self.next >= len(self.pieces):
                return None
            self.next += 1
            return self.pieces[self.next - 1]

    def work(self) -> None:  # on a worker; never raises
        with self.cond:
            if self.stopped or self.next >= len(self.pieces):
                return
            self.running += 1
        try:
            # Inference mode is thread-local: a worker writing into the caller's inference tensors
            # must be in it too (outside it, in-place updates of inference tensors are refused).
            # Only then: inference_mode(False) would turn the worker's grad mode back on.
            with torch.inference_mode() if self.inference else contextlib.nullcontext():
                for piece in iter(self._take, None):
                    self.do(piece)
        except BaseException as e:  # handed to the caller, which re-raises it
            with self.cond:
                self.errors.append(e)
                self.stopped = True  # the others take no more pieces
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    def _done(self) -> bool:
        return self.running == 0 and (self.stopped or self.next >= len(self.pieces))

    def wait(self) -> None:
        """Until every piece is done (or a worker failed) and no worker is inside one; interruptible."""
        with self.cond:
            while not self._done():
                self.cond.wait()

    def stop(self, error: BaseException | None = None) -> None:
        """No more pieces are handed out (error: what the caller is to raise); returns once no
        worker is inside one. Not interruptible: a second interrupt while it waits (at most one
        piece per worker) is dropped, the first one is what the caller raises."""
        while True:
            try:
                with self.cond:
                    if error is not None and not self.stopped and self.next < len(self.pieces):
                        self.errors.append(error)  # pieces are left undone: the caller must know
                    self.stopped = True
                    while self.running:
                        self.cond.wait()
                return
            except BaseException:
                continue


class _Workers:
    def __init__(self):
        self.busy = threading.Lock()  # held by the one run() using the workers
        self.current: _Call | None = None
        self._jobs: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []

    @property
    def size(self) -> int:
        return len(self._jobs)

    def grow(self, n: int) -> None:
        """At least n workers where threads can be started (the caller holds busy): more threads,
        never a second pool. A thread that cannot start ends the growing, not the call."""
        ready: queue.SimpleQueue = queue.SimpleQueue()
        caller_threads = torch._C.get_num_threads()
        started = 0
        try:
            while self.size < n:
                q: queue.SimpleQueue = queue.SimpleQueue()
                t = threading.Thread(target=self._loop, args=(q, ready), daemon=True, name="gmm-plugin-cpu")
                t.start()
                self._jobs.append(q)
                self._threads.append(t)
                started += 1
        except RuntimeError:  # "can't start new thread": run with the workers there are
            pass
        finally:
            for _ in range(started):
                ready.get()
            # torch.set_num_threads also records a process-wide default that new threads pick
            # up: the workers' 1 must not leak, so put the caller's value back.
            torch._C.set_num_threads(caller_threads)

    @staticmethod
    def _loop(jobs: queue.SimpleQueue, ready: queue.SimpleQueue) -> None:
        _local.worker = True
        # ATen's lazy per-thread init first, or the thread's first parallel op would undo the next
        # line; torch._C's own functions, so that a replaced torch.get_num_threads (a test's
        # monkeypatch, a profiler's wrapper) cannot skip the init and leave the worker multi-threaded.
        torch._C.get_num_threads()
        torch._C.set_num_threads(1)  # thread-local for OpenMP and MKL
        torch.set_grad_enabled(False)
        ready.put(None)
        while True:
            call = jobs.get()
            if call is None:  # close()
                return
            call.work()
            call = None  # an idle worker must not keep the call's tensors alive

    def run(self, call: _Call, workers: int) -> None:
        """The caller holds busy. Returns when the call is done; raises the first worker error."""
        self.current = call
        try:
            for q in self._jobs[:workers]:
                q.put(call)
            call.wait()
        except BaseException:
            call.stop()  # interrupted: no worker may still write once this raises
            raise
        finally:
            self.current = None
        if call.errors:
            raise call.errors[0]

    def close(self) -> None:
        """Stop the call in flight (its workers finish the piece they are in), wait until its
        caller has left, and end the threads: none may be inside a GEMM when the interpreter
        finalizes (a daemon thread that then comes back from C++ for the GIL is ended inside a
        noexcept frame: `terminate called without an active exception`, the process aborts)."""
        call = self.current
        if call is not None:
            call.stop(RuntimeError("gmm_plugin: the CPU workers were stopped at interpreter exit"))
        with self.busy:
            for q in self._jobs:
                q.put(None)
            for t in self._threads:
                t.join()
            self._jobs, self._threads = [], []


_closed = False  # set at interpreter exit: later calls run inline


def _reset_after_fork() -> None:  # threads do not survive fork(); the child builds its own
    global _pool, _pool_lock, _closed
    _pool, _pool_lock, _closed = None, threading.Lock(), False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@atexit.register
def _close_at_exit() -> None:
    global _closed
    with _pool_lock:
        pool, _closed = _pool, True
    if pool is not None:
        pool.close()


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
            or _function_mode_the_workers_would_miss():
        return 0
    n = min(torch.get_num_threads(), os.cpu_count() or 1)
    return n if n > 1 else 0


# A torch function mode class may say, in its own class body (a subclass that overrides
# __torch_function__ does not inherit the claim), that it returns what the plain call would for
# every call a piece makes (slicing, .to(dtype), mm / addmm_ / add_ with out or in place,
# zero_): then the workers may run without it. The CPU shim's literal-CUDA mode does.
WORKERS_MAY_SKIP = "gmm_plugin_workers_may_skip"


def _function_mode_the_workers_would_miss() -> bool:
    if not torch._C._is_torch_function_mode_enabled():
        return False
    stack = (torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack()))
    return not all(vars(type(mode)).get(WORKERS_MAY_SKIP, False) for mode in stack)


def run(pieces, do, workers: int) -> None:
    """Call do(piece) for every piece, on `workers` workers that each take the next piece as they
    finish the last one (so a core slowed down by another process just takes fewer pieces), and
    wait. Inline when the pool is in use by another thread (or the interpreter is exiting).

    If the wait is interrupted, the pieces not yet started are dropped and run() raises once no
    worker is inside a piece: the outputs of that call are then partly written, and nothing
    writes into them any more (the torch backend's callers then drop a fresh output; an
    interrupted accumulation into main_grad is partial, as an interrupted inline loop's is)."""
    pieces = list(pieces)
    workers = min(workers, len(pieces))
    pool = None
    if workers > 1:
        with _pool_lock:
            pool = _pool_for_use()
    if pool is None or not pool.busy.acquire(blocking=False):  # in use by another thread: inline
        for piece in pieces:
            do(piece)
        return
    try:
        pool.grow(workers)
        if pool.size < 2:  # no threads could be started
            for piece in pieces:
                do(piece)
            return
        pool.run(_Call(pieces, do, torch.is_inference_mode_enabled()), min(workers, pool.size))
    finally:
        pool.busy.release()


def _pool_for_use():
    global _pool
    if _closed:
        return None
    if _pool is None:
        _pool = _Workers()
    return _pool


def blocks(start: int, end: int, step: int):
    """[start, end) in consecutive ranges of at most `step`."""
    return [(lo, min(lo + step, end)) for lo in range(start, end, step)]


def block_size(total: int, workers: int, floor: int = 128) -> int:
    """Rows per piece: a few pieces per worker to balance, none so small that a GEMM slows down."""
    return max(floor, -(-total // (4 * workers)))
