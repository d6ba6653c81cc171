"""The CPU platform shim: what it replaces, that it is idempotent, and that disable() restores all."""
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
