"""The torch backend's CPU worker path (gmm_plugin.backends.cpu_workers): the same results as the
float64 reference for every product it takes over, used only where it may be, errors surfaced."""
from __future__ import annotations

import threading

import pytest
import torch

import gmm_plugin
from gmm_plugin.backends import cpu_workers, get_backend
from gmm_plugin.group_list import make_groups
from reference import gmm_reference, tolerance

SIZES = [5, 0, 17, 3, 0, 9, 1]  # uneven, empty groups, a group smaller than the worker count
K, N = 24, 40
# groups over 128 rows and few of them: split into row pieces (forward, dx) and output-row blocks (dW)
BIG = ([300, 0, 129], 160, 40)


@pytest.fixture
def workers(monkeypatch):
    """Force the worker path on tiny shapes and count its uses."""
    monkeypatch.setattr(cpu_workers, "MIN_FLOPS", 0)
    monkeypatch.setattr(cpu_workers, "MAX_GROUP_ROWS", float("inf"))
    monkeypatch.setattr(cpu_workers, "MIN_GROUP_CELLS", 0)
    if torch.get_num_threads() < 2:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    real = cpu_workers.run

    def counting(pieces, do, workers):
        pieces = list(pieces)
        calls.append(len(pieces))
        return real(pieces, do, workers)

    monkeypatch.setattr(cpu_workers, "run", counting)
    # fp32 products for the fused bf16 cases: the tests below check fp32 accumulation
    previous = gmm_plugin.configure(backend="torch", fused_wgrad_dtype="fp32")
    yield calls
    gmm_plugin.configure(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", ["small", "big"])
def test_forward_backward_match_reference(workers, dtype, transposed, shape):
    sizes, k, n = (SIZES, K, N) if shape == "small" else BIG
    _check_fwd_bwd(workers, dtype, transposed, sizes, k, n)


def _check_fwd_bwd(workers, dtype, transposed, sizes, K, N):
    m = sum(sizes)
    x = torch.randn(m, K, dtype=dtype, requires_grad=True)
    if transposed:
        base = torch.randn(len(sizes), N, K, dtype=dtype, requires_grad=True)
        w = base.transpose(-1, -2)
    else:
        base = w = torch.randn(len(sizes), K, N, dtype=dtype, requires_grad=True)
    y = gmm_plugin.npu_gmm_v2(x, w, group_list=sizes)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert workers, "the worker path was not taken"
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref = gmm_reference(x64, w64, sizes)
    _close(y, ref, dtype, K)
    gx, gw = torch.autograd.grad(_ref_graph(x64, w64, sizes), (x64, w64), dy.double())
    _close(x.grad, gx, dtype, N)
    # each weight-grad entry sums over its group's rows only; empty groups must be exactly 0
    _close(base.grad, gw.transpose(-1, -2) if transposed else gw, dtype, max(sizes))
    for e, c in enumerate(sizes):
        if c == 0:
            assert torch.count_nonzero(base.grad[e]) == 0


def _close(got, want, dtype, k):
    assert (got.double() - want).abs().max().item() <= tolerance(dtype, k, want.abs().max().item())


def _ref_graph(x64, w64, sizes):
    parts, start = [], 0
    for e, c in enumerate(sizes):
        parts.append(x64[start:start + c] @ w64[e])
        start += c
    return torch.cat(parts)


def test_split_k_fresh_output_zero_for_empty_groups(workers):
    backend = get_backend("torch")
    m = sum(SIZES)
    a, b = torch.randn(K, m), torch.randn(m, N)
    groups = make_groups(SIZES, cumsum=False, total=m, device=a.device, axis="M")
    with torch.no_grad():
        out = backend.grouped_mm_k(a, b, groups)
    assert workers
    _close(out, _k_ref(a, b), torch.float32, m)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[4]) == 0


def _k_ref(a, b):
    out, start = [], 0
    for c in SIZES:
        out.append(a[:, start:start + c].double() @ b[start:start + c].double())
        start += c
    return torch.stack(out)


@pytest.mark.parametrize("shape", ["small", "big"])
def test_gemm_fusion_accumulates_in_fp32(workers, shape):
    sizes, k, n = (SIZES, K, N) if shape == "small" else BIG
    w, wgrad = _fused_bf16(sizes, k, n, main_grad_start=1.0)
    assert w.grad is None and workers
    expected = 1.0 + wgrad
    # fp32 accumulation of exact bf16 products: far tighter than one bf16 rounding (2^-9 relative)
    assert (w.main_grad.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def _fused_bf16(sizes, k, n, main_grad_start):
    """A bf16 gemm_fusion forward+backward into an fp32 main_grad filled with main_grad_start;
    returns the weight and the float64 per-group x^T dy it should have added."""
    x = torch.randn(sum(sizes), k, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(sizes), k, n, dtype=torch.bfloat16, requires_grad=True)
    w.main_grad = torch.full(w.shape, main_grad_start, dtype=torch.float32)
    y = gmm_plugin.npu_gmm_v2(x, w, group_list=sizes, gemm_fusion=True, original_weight=w)
    dy = torch.randn_like(y)
    y.backward(dy)
    return w, torch.stack([x[s:s + c].detach().double().t() @ dy[s:s + c].double()
                           for s, c in zip(_starts(sizes), sizes)])


def _starts(sizes):
    out, s = [], 0
    for c in sizes:
        out.append(s)
        s += c
    return out


def test_not_used_below_threshold_or_when_recording(monkeypatch):
    x = torch.randn(8, 4, requires_grad=True)
    big = (float(1 << 40), 128.0, 1 << 22)  # flops, mean group rows, group matrix size
    monkeypatch.setattr(cpu_workers, "MIN_FLOPS", 1 << 31)
    monkeypatch.setattr(cpu_workers, "MAX_GROUP_ROWS", 512)
    monkeypatch.setattr(cpu_workers, "MIN_GROUP_CELLS", 1 << 20)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with torch.no_grad():
        assert cpu_workers.usable_workers(*big, x) == 2
        assert cpu_workers.usable_workers(1.0, 128.0, 1 << 22, x) == 0         # too little work
        assert cpu_workers.usable_workers(big[0], 4096.0, 1 << 22, x) == 0     # big groups: usual GEMMs
        assert cpu_workers.usable_workers(big[0], 128.0, 1 << 10, x) == 0      # small matrices
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_workers.usable_workers(*big, x) == 0                    # autocast is thread-local
    assert cpu_workers.usable_workers(*big, x) == 0                            # grad mode + requires_grad
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    with torch.no_grad():
        assert cpu_workers.usable_workers(*big, x) == 0                        # one thread: nothing to share


def _raise_on(bad):
    def do(piece):
        if piece == bad:
            raise ValueError("from a worker")
    return do


def test_worker_error_reaches_the_caller_and_pool_stays_usable():
    with pytest.raises(ValueError, match="from a worker"):
        cpu_workers.run(range(6), _raise_on(3), 2)
    seen = []
    cpu_workers.run(range(50), seen.append, 2)
    assert sorted(seen) == list(range(50))  # every piece exactly once


def test_workers_are_single_threaded_and_caller_threads_unchanged():
    before = torch.get_num_threads()
    counts = []
    cpu_workers.run(range(2), lambda _: counts.append(torch.get_num_threads()), 2)
    assert counts == [1, 1]
    assert torch.get_num_threads() == before
    other = []
    t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert other == [before]  # the workers' setting did not leak to new threads


def test_workers_stay_single_threaded_when_made_under_a_replaced_get_num_threads(monkeypatch):
    """A pool made while torch.get_num_threads is replaced (tests/patches/test_cpu_platform.py does
    it) skipped ATen's per-thread init: the workers' first GEMM re-initialised them to the process
    default, and every later piece ran multi-threaded (the whole suite's order-dependent [2, 2])."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pool = cpu_workers._Workers()
    assert pool.busy.acquire()
    try:
        pool.grow(2)
        a = torch.randn(64, 64)
        counts = []
        call = cpu_workers._Call(list(range(4)), lambda _: (torch.mm(a, a), counts.append(torch._C.get_num_threads())),
                                 False)
        pool.run(call, 2)
    finally:
        pool.busy.release()
        pool.close()
    assert counts == [1, 1, 1, 1]


def test_busy_pool_runs_inline():
    cpu_workers.run(range(2), lambda _: None, 2)  # make sure the pool exists
    pool = cpu_workers._pool
    assert pool.busy.acquire()
    try:
        names = []
        cpu_workers.run(range(2), lambda _: names.append(threading.current_thread().name), 2)
        assert names == [threading.current_thread().name] * 2
    finally:
        pool.busy.release()


def test_blocks_cover_exactly():
    for start, end in ((0, 0), (3, 4), (5, 70), (0, 64)):
        for step in (1, 7, 64, 128):
            b = cpu_workers.blocks(start, end, step)
            assert sum(hi - lo for lo, hi in b) == end - start
            assert all(0 < hi - lo <= step for lo, hi in b)
            assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
            assert not b or (b[0][0] == start and b[-1][1] == end)


def test_idle_workers_keep_no_tensor_alive(workers):
    import gc
    import weakref
    x, w = torch.randn(sum(SIZES), K), torch.randn(len(SIZES), K, N)
    with torch.no_grad():
        y = gmm_plugin.npu_gmm_v2(x, w, group_list=SIZES)
    assert workers
    ref = weakref.ref(y)
    del y
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_pool_usable_in_a_forked_child():
    import multiprocessing as mp
    cpu_workers.run(range(2), lambda _: None, 2)  # the parent's pool exists (its threads do not survive fork)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_runs_pool, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == list(range(10))


def _child_runs_pool(q):
    seen = []
    cpu_workers.run(range(10), seen.append, 2)  # would wait forever on the parent's dead threads
    q.put(sorted(seen))


@pytest.mark.parametrize("use_workers", [False, True])
def test_fused_bf16_group_larger_than_one_cast_block(use_workers, monkeypatch):
    """Groups over _BLOCK_ROWS rows are converted block by block; the sum stays fp32-accurate."""
    from gmm_plugin.backends import torch_backend
    if use_workers:
        # two workers whatever the shapes and thread count (patching torch.get_num_threads instead
        # would reach a pool started here, whose workers' thread setup calls it)
        monkeypatch.setattr(cpu_workers, "usable_workers", lambda *args: 2)
    sizes = [2 * torch_backend._BLOCK_ROWS + 37, 0, 5]
    with gmm_plugin.settings(fused_wgrad_dtype="fp32"):
        w, expected = _fused_bf16(sizes, 16, 24, main_grad_start=0.0)
    assert (w.main_grad.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.count_nonzero(w.main_grad[1]) == 0


def test_inference_mode_with_the_worker_pool():
    """The issue's reproduction (x [2048, 1024], w [8, 1024, 1024], counts [256] * 8, 2 threads):
    under torch.inference_mode() the workers used to fail with "Inplace update to inference tensor
    outside InferenceMode is not allowed". Natural thresholds: these shapes do use the pool."""
    from reference import gmm_reference
    x, w = torch.randn(2048, 1024), torch.randn(8, 1024, 1024)
    counts = [256] * 8
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = []
    real = cpu_workers.run
    try:
        cpu_workers.run = lambda pieces, do, n: calls.append(n) or real(pieces, do, n)
        with gmm_plugin.settings(backend="torch"), torch.inference_mode():
            y = gmm_plugin.npu_gmm_v2(x, w, group_list=counts)
        with torch.no_grad():
            same = gmm_plugin.npu_gmm_v2(x, w, group_list=counts)
    finally:
        cpu_workers.run = real
        torch.set_num_threads(threads)
    assert calls and calls[0] == 2, "the shapes of the reproduction no longer reach the worker pool"
    assert y.is_inference() and torch.equal(y, same)
    ref = gmm_reference(x, w, counts)
    assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


class _Interrupted(Exception):
    pass


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_kill"), reason="needs POSIX signals")
@pytest.mark.parametrize("interrupt", [_Interrupted, KeyboardInterrupt])
def test_interrupted_call_leaves_no_late_writes_and_the_next_calls_are_right(interrupt, monkeypatch):
    """Issue 21 item 1: an 8 x 512-row, K = N = 1024 fp32 npu_gmm_v2 on the pool, interrupted by
    an exception from a SIGALRM handler while it waits, then 10 more calls: they used to return
    before their own pieces were written (the interrupted call's late completions were taken for
    theirs). The signal comes from a worker inside a piece, which then holds that piece until
    the next call has started (bounded: 1.5 s), so the old race happens on every run; fixed, the
    next call cannot start before the interrupted one's workers are out, and the piece goes on
    after the wait."""
    import signal
    x, w = torch.randn(8 * 512, 1024), torch.randn(8, 1024, 1024)
    counts = [512] * 8
    ref = gmm_reference(x, w, counts)
    next_call_started = threading.Event()
    once = threading.Lock()  # one signal, whichever worker comes first
    sent = threading.Event()
    state = {"calls": 0, "signalled": False, "raised": False, "late_writes": 0}
    real = cpu_workers.run

    def run(pieces, do, n):
        state["calls"] += 1
        if state["calls"] > 1:
            next_call_started.set()
            return real(pieces, do, n)

        def first_do(piece):
            if threading.current_thread().name == "gmm-plugin-cpu" and once.acquire(blocking=False):
                state["signalled"] = True
                signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
                sent.set()
                next_call_started.wait(1.5)
            do(piece)
            if state["raised"]:
                state["late_writes"] += 1
        return real(pieces, first_do, n)

    def handler(signum, frame):
        raise interrupt("interrupted")

    monkeypatch.setattr(cpu_workers, "run", run)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the pool runs whatever the host
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with gmm_plugin.settings(backend="torch"), torch.no_grad():
            with pytest.raises(interrupt):
                gmm_plugin.npu_gmm_v2(x, w, group_list=counts)
            state["raised"] = True
            errors = [(gmm_plugin.npu_gmm_v2(x, w, group_list=counts).double() - ref).abs().max().item()
                      for _ in range(10)]
    finally:  # (the old code could take the signal after the test: never under SIGALRM's default)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        sent.wait(10)
        signal.signal(signal.SIGALRM, previous)
    assert state["signalled"] and state["calls"] == 11, "the calls no longer reach the worker pool"
    # fp32 sums of 1024 products of N(0,1) values: |y| ~ 32, rounding ~ 1e-5 of it
    assert max(errors) <= 1e-4 * ref.abs().max().item(), errors
    assert state["late_writes"] == 0, "a piece of the interrupted call ran after run() had raised"


def _pool_threads():
    return [t for t in threading.enumerate() if t.name == "gmm-plugin-cpu" and t.is_alive()]


def test_more_workers_grow_the_pool_instead_of_leaving_one_behind():
    """Issue 21 item 6 (pool part): asking for more workers built a second pool and left the
    first one's threads blocked for the rest of the process."""
    cpu_workers.run(range(8), lambda _: None, 2)
    before = cpu_workers._pool.size
    for n in (3, 2, 4):
        seen = []
        cpu_workers.run(range(40), seen.append, n)
        assert sorted(seen) == list(range(40))
    assert cpu_workers._pool.size == max(before, 4)
    assert len(_pool_threads()) == cpu_workers._pool.size


_EXIT_IN_A_GEMM = """
import threading, torch
from gmm_plugin.backends import cpu_workers
a = torch.randn(2048, 2048)
inside = threading.Event()
def do(piece):
    inside.set()
    for _ in range(4):  # a few seconds of one-thread GEMMs: the interpreter exits meanwhile
        torch.mm(a, a)
threading.Thread(target=cpu_workers.run, args=(range(4), do, 2), daemon=True).start()
assert inside.wait(60)
"""


def test_interpreter_exit_while_a_worker_is_in_a_gemm():
    """Exit while a worker thread is inside a GEMM: the thread came back from C++ for the GIL
    after finalization had begun, and CPython ended it inside a noexcept frame: `terminate called
    without an active exception`, SIGABRT. Now an atexit hook stops the call and lets the pieces
    in flight finish before the threads end."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _EXIT_IN_A_GEMM], capture_output=True, text=True, timeout=120)
    assert "terminate called" not in proc.stderr and proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


def test_a_worker_that_cannot_start_ends_the_growing_not_the_call(monkeypatch):
    """Fault injection: threading.Thread.start fails ("can't start new thread") when the pool
    grows. The call used to raise it (the pool was rebuilt from scratch for every larger size);
    now it runs on the workers there are, and the workers' one-thread setting does not leak."""
    cpu_workers.run(range(4), lambda _: None, 2)
    size = cpu_workers._pool.size
    threads = torch.get_num_threads()
    real_start = threading.Thread.start

    def start(self):
        if self.name == "gmm-plugin-cpu":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    seen = []
    cpu_workers.run(range(40), seen.append, size + 2)
    assert sorted(seen) == list(range(40)) and cpu_workers._pool.size == size
    monkeypatch.setattr(threading.Thread, "start", real_start)
    other = []
    t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert other == [threads]
