"""End to end on CPU: a GPTModel with MoE layers built from Megatron's local spec with
moe_grouped_gemm=True, wrapped in Megatron's DistributedDataParallel (overlapped grad reduce,
distributed optimizer layout, fp32 main_grad), two micro-batches, through the CPU shim and the
patched experts. With gemm_fusion the expert gradients are accumulated into main_grad by the op;
every main_grad must equal the unfused run's."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
from patches import experts as ex  # noqa: E402

REAL_V2 = ex.gmm_ops.npu_gmm_v2


@pytest.fixture(autouse=True)
def plugin():
    patches.revert()
    yield
    patches.revert()


def _train(fusion, monkeypatch):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    patches.apply({"backend": "torch", "gemm_fusion": fusion, "cpu_shim": "auto"})
    h.ensure_world()
    fused = []

    def spy(x, w, **kw):
        fused.append(bool(kw.get("gemm_fusion")))
        return REAL_V2(x, w, **kw)
    monkeypatch.setattr(ex.gmm_ops, "npu_gmm_v2", spy)

    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    config = h.make_config(experts=4, topk=2, hidden=32, ffn=48, num_attention_heads=4, moe_aux_loss_coeff=1e-2,
                           masked_softmax_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
                           apply_rope_fusion=False)
    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=True)
    model = GPTModel(config, spec, vocab_size=64, max_sequence_length=16)
    assert type(model.decoder.layers[0].mlp.experts).__name__ in ("GroupedMLP", "GmmGroupedMLP")
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True), module=model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(16).expand(2, 16)
    ddp.zero_grad_buffer()
    with ddp.no_sync():
        ddp(ids, pos, None, labels=ids).mean().backward()
    loss = ddp(ids, pos, None, labels=ids).mean()
    loss.backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.clone() for n, p in ddp.named_parameters()}
    patches.revert()
    return loss.item(), grads, fused


def test_gpt_moe_ddp_main_grad_with_and_without_gemm_fusion(monkeypatch):
    loss0, plain, fused0 = _train(False, monkeypatch)
    loss1, fused, fused1 = _train(True, monkeypatch)
    assert fused0 and not any(fused0)
    assert fused1 and all(fused1), "with gemm_fusion and DDP's main_grad every expert GEMM must fuse"
    assert loss0 == loss1
    experts = [n for n in plain if "experts" in n]
    assert experts and all(plain[n].abs().sum() > 0 for n in experts)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
