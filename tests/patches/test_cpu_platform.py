"""The CPU platform shim: what it replaces, that it is idempotent, and that disable() restores all."""
import ctypes
import importlib.util

import pytest
import torch

from patches import cpu_platform

pytestmark = pytest.mark.skipif(cpu_platform.accelerator_present(), reason="the shim stays off with an accelerator")

CUDA_NAMES = ("current_device", "Stream", "Event", "current_stream", "default_stream", "stream",
              "synchronize", "get_device_capability", "get_rng_state", "set_rng_state", "manual_seed",
              "manual_seed_all")


def _snapshot():
    snap = {("cuda", n): torch.cuda.__dict__.get(n) for n in CUDA_NAMES}
    snap.update({("cuda.random", n): vars(torch.cuda.random).get(n) for n in
                 ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all")})
    return snap


@pytest.fixture
def shim():
    before = _snapshot()
    yield cpu_platform
    cpu_platform.disable()
    after = _snapshot()
    assert all(after[k] is before[k] for k in before), "disable() must restore every original object"


def test_enable_is_idempotent_and_reversible(shim):
    original = torch.cuda.current_device
    assert not shim.is_enabled()
    assert shim.enable() is True
    assert shim.enable() is True  # second call: no second layer of patches
    assert shim.is_enabled()
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    shim.disable()
    shim.disable()
    assert not shim.is_enabled()
    assert torch.cuda.current_device is original


def test_streams_and_events_are_no_ops(shim):
    shim.enable()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pass
    ev = s.record_event()
    ev.synchronize()
    assert ev.query() and torch.cuda.current_stream() is torch.cuda.default_stream()
    torch.cuda.synchronize()
    assert torch.cuda.get_device_capability() == (9, 0)
    assert torch.cuda.is_available() is False  # never claims a GPU


def test_cuda_rng_is_the_cpu_generator(shim):
    shim.enable()
    torch.cuda.manual_seed(123)
    a = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(4))
    state = torch.cuda.get_rng_state()
    b = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(3))


@pytest.mark.megatron
@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_megatron_rng_tracker_forks_cpu_states(shim):
    from megatron.core.tensor_parallel import random as mrandom
    orig_get, orig_set = mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state
    shim.enable()
    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("x", 7)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork("x"):
        inside = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), outside)  # fork restores the default state
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(5))  # and used the tracked seed inside
    shim.disable()
    assert mrandom._get_cuda_rng_state is orig_get and mrandom._set_cuda_rng_state is orig_set


@pytest.mark.megatron
@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_disable_drops_the_cached_dispatcher_stream(shim):
    from megatron.core.transformer.moe import token_dispatcher as td
    shim.enable()
    td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cuda.Stream()
    shim.disable()
    assert td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None


def test_cuda_literals_on_cpu_only_inside_its_scope():
    """Megatron's optimizer code: device='cuda', .cuda() and grad.type() checks mean the CPU inside."""
    from patches import cpu_platform
    x = torch.ones(3)
    with cpu_platform.cuda_literals_on_cpu():
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu"
        assert x.cuda() is x
        assert x.type() == "torch.cuda.FloatTensor"
    assert x.type() == "torch.FloatTensor"
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(2, device="cuda")


# ---------------------------------------------------------------- the training part (megatron.training)

def test_literal_cuda_to_means_cpu():
    x = torch.ones(2)
    with cpu_platform.cuda_literals_on_cpu():
        assert x.to("cuda").device.type == "cpu"
        assert x.to(torch.device("cuda:0"), torch.float64).dtype == torch.float64
        assert torch.ones(1, device=torch.device("cuda", 0)).device.type == "cpu"


def test_typing_override_is_pep_698_and_recorded():
    import typing
    from patches._patching import PatchSet
    had = hasattr(typing, "override")
    patches = PatchSet()
    assert cpu_platform.ensure_typing_override(patches) is (not had)
    class Base:
        def f(self):
            return 1
    class Child(Base):
        @typing.override
        def f(self):
            return 2
    assert Child().f() == 2 and getattr(Child.f, "__override__", False) is True
    patches.restore()
    assert hasattr(typing, "override") is had


@pytest.fixture
def training_shim():
    import typing
    from patches._patching import PatchSet
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.training") is None:
        pytest.skip("megatron.training is not installed (megatron-core < 0.19 wheels ship only megatron/core)")
    compat = PatchSet()
    cpu_platform.ensure_typing_override(compat)  # 0.19's training code on Python 3.11
    from megatron.training import initialize
    before = (_snapshot(), initialize.initialize_megatron, torch.cuda.device_count, torch.cuda.set_device,
              vars(typing).get("override"), torch._C._len_torch_function_stack())
    yield cpu_platform
    cpu_platform.disable()
    after = (_snapshot(), initialize.initialize_megatron, torch.cuda.device_count, torch.cuda.set_device,
             vars(typing).get("override"), torch._C._len_torch_function_stack())
    assert after[0] == before[0] and all(a is b for a, b in zip(after[1:5], before[1:5])) and after[5] == before[5]
    compat.restore()


def test_enable_training_covers_the_run_and_disable_restores(training_shim):
    assert training_shim.enable_training() is True and training_shim.enable_training() is True
    assert training_shim.is_enabled() and training_shim.training_enabled()
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # process-wide, no `with`
    import typing
    assert hasattr(typing, "override")
    training_shim.disable()
    assert not training_shim.training_enabled()
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")


def test_disable_refuses_to_pop_someone_elses_mode(training_shim):
    training_shim.enable_training()
    other = cpu_platform.cuda_literals_on_cpu()
    with other:
        with pytest.raises(RuntimeError, match="another torch function mode"):
            training_shim.disable()
    training_shim.disable()  # ours is on top again: now it goes
    assert not training_shim.training_enabled()


def test_initialize_megatron_gets_allow_no_cuda_and_one_device_only_while_it_runs(training_shim, monkeypatch):
    from megatron.training import initialize
    seen = {}

    def fake(extra_args_provider=None, args_defaults={}, ignore_unknown_args=False, allow_no_cuda=False, **kw):
        seen.update(allow_no_cuda=allow_no_cuda, devices=torch.cuda.device_count(), extra=extra_args_provider)
        torch.cuda.set_device(0)  # a no-op while it runs; CUDA's own raises without a GPU
        return "done"

    monkeypatch.setattr(initialize, "initialize_megatron", fake)
    training_shim.enable_training()
    wrapped = initialize.initialize_megatron
    assert wrapped is not fake and wrapped("provider", {}) == "done"  # positional args keep their places
    assert seen == {"allow_no_cuda": True, "devices": 1, "extra": "provider"}
    assert torch.cuda.device_count() == 0  # back to the truth once it returned (no accelerator here)
    training_shim.disable()
    assert initialize.initialize_megatron is fake


def test_data_loader_iterators_leave_the_dropout_stream_alone(training_shim):
    """The root of the non-bit-exact resume: creating a DataLoader iterator drew a seed from the CPU
    default generator, which is the shim's "CUDA" (dropout) generator."""
    import importlib
    module = None
    for name in cpu_platform._DATA_LOADER_MODULES:
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    original = module.build_pretraining_data_loader
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2)
    state = torch.get_rng_state()
    iter(loader)
    assert not torch.equal(torch.get_rng_state(), state)  # without the shim: the draw moves it

    training_shim.enable_training()
    wrapped = module.build_pretraining_data_loader
    assert wrapped is not original
    import megatron.training.training as training_loop
    assert training_loop.build_pretraining_data_loader is wrapped  # the alias pretrain() calls
    # The real builder needs Megatron's global args; the wrapper only post-processes its result.
    inner = cpu_platform._wrap_data_loader_builder(lambda *a: torch.utils.data.DataLoader(list(range(8)), batch_size=2))
    first, second = inner(), inner()
    state = torch.get_rng_state()
    it1, it2 = iter(first), iter(second)
    assert torch.equal(torch.get_rng_state(), state)
    assert it1._base_seed == it2._base_seed  # a fixed private seed: the same on every run
    training_shim.disable()
    assert module.build_pretraining_data_loader is original



class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes_while_holding(nbytes: int = 64 << 20) -> int:
    """How many more bytes glibc holds in mmap'd blocks while a tensor of nbytes is alive."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    before = mallinfo2().hblkhd
    block = torch.empty(nbytes, dtype=torch.uint8)
    grown = mallinfo2().hblkhd - before
    del block
    return grown


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_glibc_keeps_freed_memory_while_on(shim):
    """A step-sized buffer (64 MB, above glibc's largest mmap threshold) comes from glibc's heap,
    which keeps freed memory for the next step, while the shim is on; from a fresh mmap, handed
    back to the kernel on free, before and after (disable() restores glibc's defaults)."""
    nbytes = 64 << 20
    assert _mmapped_bytes_while_holding(nbytes) >= nbytes
    shim.enable()
    assert _mmapped_bytes_while_holding(nbytes) == 0
    shim.disable()
    assert _mmapped_bytes_while_holding(nbytes) >= nbytes


_MMAP_AFTER_ENABLE_DISABLE = """
import ctypes, os, sys, torch
sys.path.insert(0, os.getcwd())
from patches import cpu_platform
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
def mmapped_chunks():  # mmapped chunks while one 64 MiB block is alive
    before = mallinfo2().hblks
    block = torch.empty(64 << 20, dtype=torch.uint8)
    return mallinfo2().hblks - before
os.environ.update(LATE)  # set after start-up: glibc never reads it
print(mmapped_chunks(), end=" ")
cpu_platform.enable(force=True)
cpu_platform.disable()
print(mmapped_chunks())
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
@pytest.mark.parametrize("startup, late, expected", [
    ({"MALLOC_MMAP_MAX_": "0"}, {}, "0 0"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, {}, "0 0"),
    ({}, {"MALLOC_MMAP_MAX_": "0"}, "1 1"),  # only the start-up environment counts
])
def test_disable_restores_the_malloc_settings_the_process_started_with(startup, late, expected):
    """Issue 21 item 3: disable() wrote glibc's compiled-in defaults, so a process started with
    MALLOC_MMAP_MAX_=0 (or the tunable) got mmapped chunks again after enable/disable."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")}
    env.update(startup)
    script = f"LATE = {late!r}\n" + _MMAP_AFTER_ENABLE_DISABLE
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected, out.stdout


def test_startup_malloc_values_follow_glibc_precedence():
    M, T = cpu_platform._M_MMAP_MAX, cpu_platform._M_TRIM_THRESHOLD
    values = cpu_platform._startup_malloc_values
    assert values({}) == {M: 65536, T: 128 * 1024}
    assert values({"MALLOC_MMAP_MAX_": "7", "MALLOC_TRIM_THRESHOLD_": "0x1000"}) == {M: 7, T: 4096}
    # GLIBC_TUNABLES over the alias, its last entry for a name, garbage ignored
    env = {"MALLOC_MMAP_MAX_": "7", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=1:glibc.malloc.mmap_max=2:x"}
    assert values(env)[M] == 2
    assert values({"MALLOC_MMAP_MAX_": "lots"})[M] == 65536


def _pool_runs_per_step(monkeypatch):
    """Pool runs of one forward+backward of a grouped product the CPU workers take (the shapes of
    tests/test_cpu_workers.py's inference test: natural thresholds, two threads)."""
    import gmm_plugin
    from gmm_plugin.backends import cpu_workers
    calls = []
    real = cpu_workers.run
    monkeypatch.setattr(cpu_workers, "run", lambda pieces, do, n: calls.append(n) or real(pieces, do, n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1024, generator=g).requires_grad_(True)
    w = torch.randn(8, 1024, 1024, generator=g).requires_grad_(True)
    with gmm_plugin.settings(backend="torch"):
        y = gmm_plugin.npu_gmm_v2(x, w, group_list=[256] * 8)
        y.backward(torch.ones_like(y))
    return len(calls), y.detach(), x.grad, w.grad


def test_enable_training_keeps_the_cpu_pool_for_forward_gemms(monkeypatch):
    """Issue 21 item 7: enable_training() leaves its literal-CUDA torch function mode pushed, and
    the pool refused every function mode: the forward GEMM (3 pool runs per step: forward, dx, dW)
    ran without the workers. The same step with the mode pushed uses the pool as often and gives
    the same numbers."""
    plain = _pool_runs_per_step(monkeypatch)
    assert plain[0] == 3, "the shapes no longer reach the worker pool"
    assert cpu_platform.enable_training(force=True)
    try:
        training = _pool_runs_per_step(monkeypatch)
    finally:
        cpu_platform.disable()
    assert training[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(training[1:], plain[1:]))

    class Other(torch.overrides.TorchFunctionMode):  # any other mode still keeps the workers off
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Other():  # (the backward's GEMMs run outside function modes: autograd does not carry them)
        assert _pool_runs_per_step(monkeypatch)[0] == plain[0] - 1


# ---------------------------------------------------------------- faults halfway (docs/robustness.md)

class _Injected(Exception):
    pass


def _shim_state():
    import logging
    return (_snapshot(), list(logging.getLogger(cpu_platform._RNG_LOGGER).filters), cpu_platform.is_enabled(),
            cpu_platform.training_enabled(), cpu_platform._kept_memory, torch._C._len_torch_function_stack())


def _fail_glibc_keep(real):
    def glibc(keep):
        if keep:
            raise _Injected("mallopt")
        real(keep)
    return glibc


@pytest.mark.parametrize("where", ["_patch_megatron", "_glibc_keeps_freed_memory"])
def test_enable_failing_halfway_leaves_nothing_behind(where, monkeypatch):
    """enable() raising at its last steps used to leave the RNG log filter installed."""
    before = _shim_state()
    if where == "_patch_megatron":
        monkeypatch.setattr(cpu_platform, where, lambda: (_ for _ in ()).throw(_Injected(where)))
    else:
        monkeypatch.setattr(cpu_platform, where, _fail_glibc_keep(cpu_platform._glibc_keeps_freed_memory))
    try:
        with pytest.raises(_Injected):
            cpu_platform.enable(force=True)
        assert _shim_state() == before
    finally:
        cpu_platform.disable()


@pytest.mark.parametrize("where", ["_patch_training", "mode"])
def test_enable_training_failing_halfway_leaves_nothing_behind(where, monkeypatch):
    """enable_training() raising after its enable() used to leave the shim on."""
    before = _shim_state()
    if where == "mode":
        monkeypatch.setattr(cpu_platform._CudaLiteralsOnCpu, "__enter__",
                            lambda self: (_ for _ in ()).throw(_Injected(where)))
    else:
        monkeypatch.setattr(cpu_platform, where, lambda: (_ for _ in ()).throw(_Injected(where)))
    try:
        with pytest.raises(_Injected):
            cpu_platform.enable_training(force=True)
        assert _shim_state() == before
    finally:
        cpu_platform.disable()
