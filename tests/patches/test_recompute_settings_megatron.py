"""Megatron's own recomputation (tensor_parallel.checkpoint, the reentrant CheckpointFunction that
--recompute-granularity full and the MoE layer's `moe` recompute use, and CheckpointWithoutOutput,
used for `moe_act`) of a fused GMM region checkpointed inside a `with gmm_plugin.settings()`
block, backpropagated outside it: the numbers of the same run without recomputation (issue 21
item 2)."""
from __future__ import annotations

import pytest
import torch

import gmm_plugin
from gmm_plugin.ops import gmm
from patches import cpu_platform

tensor_parallel = pytest.importorskip("megatron.core.tensor_parallel")

E, K, N, M = 4, 64, 32, 256
COUNTS = torch.tensor([100, 0, 60, 96])


@pytest.fixture(autouse=True)
def megatron_rng_on_cpu():
    """Megatron's checkpoints save and restore "CUDA" RNG states: the CPU shim provides them."""
    ours = not cpu_platform.is_enabled() and cpu_platform.enable(force=True)
    yield
    if ours:
        cpu_platform.disable()


def run(mode, fused_wgrad_dtype):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(E, K, N, generator=g).bfloat16())
    p.main_grad, p.grad_added_to_main_grad = torch.zeros(E, K, N), False
    x = torch.randn(M, K, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(M, N, generator=g).bfloat16()

    def region(x):
        y = gmm.npu_gmm_v2(x, p, group_list=COUNTS, gemm_fusion=True, original_weight=p)
        return y * y.float().sigmoid().to(y.dtype)

    with gmm_plugin.settings(fused_wgrad_dtype=fused_wgrad_dtype):
        if mode == "plain":
            y = region(x)
        elif mode == "checkpoint":
            y = tensor_parallel.checkpoint(region, False, x)
        else:  # CheckpointWithoutOutput: y is freed and recomputed by a hook on a later tensor
            ckpt = _without_output()
            y = ckpt.checkpoint(region, x)
        out = y * 2
        if mode == "without_output":
            ckpt.discard_output_and_register_recompute(out)
    out.backward(dy)
    return p.main_grad, x.grad


def _without_output():
    import inspect
    cls = tensor_parallel.CheckpointWithoutOutput
    # fp8=None, as Megatron's experts build it without fp8 (a bare False reaches TE's fp8 state)
    return cls(fp8=None) if "fp8" in inspect.signature(cls.__init__).parameters else cls()


@pytest.mark.parametrize("mode", ["checkpoint", "without_output"])
def test_megatron_recomputation_uses_the_settings_of_the_forward(mode):
    if mode == "without_output" and not hasattr(tensor_parallel, "CheckpointWithoutOutput"):
        pytest.skip("this megatron-core has no CheckpointWithoutOutput")
    want = run("plain", "fp32")
    got = run(mode, "fp32")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(run("plain", "input")[0], want[0])  # the setting matters here
