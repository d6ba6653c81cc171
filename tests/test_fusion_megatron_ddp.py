"""gemm_fusion under Megatron's real DistributedDataParallel on CPU (gloo, world size 1)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

import patches.cpu_platform as cpu_platform  # noqa: E402
from gmm_plugin.ops import gmm  # noqa: E402

E, K, N, M = 4, 16, 8, 24


@pytest.fixture(scope="module")
def gloo_world():
    cpu_platform.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    yield
    cpu_platform.disable()


class TwoGmmExperts(torch.nn.Module):
    """Two expert weights in GroupedMLP's layouts: w1 [K, E*N] viewed [E, K, N], w2 [E, K, N] passed transposed."""

    def __init__(self, fused: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(K, E * N, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(E, K, N, generator=g))
        self.fused = fused

    def forward(self, x, counts):
        kw1 = dict(gemm_fusion=True, original_weight=self.w1) if self.fused else {}
        h = gmm.npu_gmm_v2(x, self.w1.view(E, K, N), group_list=counts, **kw1)
        kw2 = dict(gemm_fusion=True, original_weight=self.w2) if self.fused else {}
        return gmm.npu_gmm_v2(h, self.w2.transpose(-1, -2), group_list=counts, **kw2)


def train_grads(fused: bool, overlap: bool, micro_batches):
    config = TransformerConfig(num_layers=1, hidden_size=K, num_attention_heads=1, use_cpu_initialization=True)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                               use_distributed_optimizer=False)
    model = DistributedDataParallel(config, ddp_config, TwoGmmExperts(fused))
    model.zero_grad_buffer()
    for i, (x, counts, dy) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        ctx = model.no_sync() if not last else torch.enable_grad()
        with ctx:  # as Megatron's schedule does: reduce only after the last micro-batch
            model(x, counts).backward(dy)
    model.finish_grad_sync()
    module = model.module
    return {name: (p.main_grad.clone(), p.grad) for name, p in module.named_parameters()}


def reference_grads(micro_batches):
    m = TwoGmmExperts(False).double()
    for x, counts, dy in micro_batches:
        out, s = [], 0
        for e, c in enumerate(counts.tolist()):
            h = x[s:s + c].double() @ m.w1.view(E, K, N)[e]
            out.append(h @ m.w2.transpose(-1, -2)[e])
            s += c
        torch.cat(out).backward(dy.double())
    return {"w1": m.w1.grad, "w2": m.w2.grad}


@pytest.mark.parametrize("overlap", [False, True], ids=["no_overlap", "overlap"])
def test_fused_and_unfused_ddp_give_the_same_main_grad(gloo_world, overlap):
    g = torch.Generator().manual_seed(1)
    micro_batches = [(torch.randn(M, K, generator=g), torch.tensor(c), torch.randn(M, K, generator=g))
                     for c in ([6, 0, 10, 8], [0, 0, 24, 0], [3, 5, 7, 9])]
    fused = train_grads(True, overlap, micro_batches)
    plain = train_grads(False, overlap, micro_batches)
    truth = reference_grads(micro_batches)
    for name in ("w1", "w2"):
        (mg_f, grad_f), (mg_p, grad_p) = fused[name], plain[name]
        assert mg_f.dtype == torch.float32
        assert grad_f is None and grad_p is None  # DDP consumed the (dummy) gradients
        scale = truth[name].abs().max().item()
        assert torch.allclose(mg_f, mg_p, rtol=0, atol=1e-5 * scale)
        # nothing counted twice: both equal the float64 sum over micro-batches, not a multiple of it
        assert torch.allclose(mg_f.double(), truth[name], rtol=0, atol=1e-5 * scale)
