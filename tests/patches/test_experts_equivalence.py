"""The patched grouped experts against Megatron's own SequentialMLP, with identical weights.

Outputs and every gradient (tokens, router probabilities, both expert weights, the router) must
match: fp32 to 1e-5 relative, bf16/fp16 to a few ulps of the dtype. Cases: 1, 4 and 8 local
experts, top-1 and top-2, GLU on and off, experts with zero tokens and a rank with zero tokens.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
from gmm_plugin import torch_caps  # noqa: E402

# Norm-wise relative tolerances. fp32: the two paths sum the same products in a different order
# (~1e-7 here); the bar is 1e-5. bf16/fp16: each path rounds every GEMM output and the
# activation to the dtype (half an ulp each, 2^-8 / 2^-11 relative) with different accumulation
# orders underneath; four roundings in a chain give at most ~4 ulps.
TOL = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0 ** -8, torch.float16: 4 * 2.0 ** -11}
COUNTS = {1: [7], 4: [3, 0, 5, 2], 8: [2, 0, 0, 4, 1, 0, 3, 1]}


@pytest.fixture(scope="module", autouse=True)
def plugin():
    patches.revert()
    patches.apply({"backend": "torch", "cpu_shim": "auto"})
    h.ensure_world()
    yield
    patches.revert()


def _pair(num, glu, dtype, **extra):
    config = h.make_config(experts=num, glu=glu, dtype=dtype, **extra)
    torch.manual_seed(1)
    seq = h.build_sequential(num, config)
    grouped = h.build_grouped(num, config)
    h.copy_sequential_to_grouped(seq, grouped)
    return seq, grouped


def _run(module, x, counts, probs, dy):
    x = x.detach().clone().requires_grad_()
    probs = probs.detach().clone().requires_grad_()
    out, bias = module(x, counts, probs)
    assert bias is None
    (out.float() * dy).sum().backward()
    return out, x.grad, probs.grad


def _check(name, got, want, dtype):
    assert got.shape == want.shape, name
    if want.numel() == 0 or want.abs().max() == 0:
        assert torch.equal(got, torch.zeros_like(got)), f"{name}: expected zeros"
        return
    err = h.rel_err(got, want)
    assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:.3g} ({dtype})"


# fp16 only with 4 experts: CPUs have no fast fp16 GEMM, once is enough to cover the dtype.
EXPERT_CASES = [pytest.param(num, glu, dtype, zero_rank, id=f"E{num}-{'glu' if glu else 'noglu'}-"
                             f"{str(dtype)[6:]}-{'zero_token_rank' if zero_rank else 'tokens'}")
                for num in (1, 4, 8) for glu in (True, False) for zero_rank in (False, True)
                for dtype in (torch.float32, torch.bfloat16, torch.float16)
                if dtype != torch.float16 or num == 4]


@pytest.mark.parametrize("num,glu,dtype,zero_rank", EXPERT_CASES)
def test_experts_match_sequential_mlp(num, glu, dtype, zero_rank):
    if not zero_rank and not torch_caps.cpu_mm(dtype):
        pytest.skip(f"Megatron's SequentialMLP (the reference) runs a {dtype} torch.mm, which this torch's CPU lacks")
    seq, grouped = _pair(num, glu, dtype)
    counts = torch.tensor([0] * num if zero_rank else COUNTS[num])
    rows = int(counts.sum())
    hidden = seq.config.hidden_size
    x = torch.randn(rows, hidden).to(dtype)
    probs = torch.rand(rows)  # Megatron's permuted_probs are fp32
    dy = torch.randn(rows, hidden)

    got = _run(grouped, x, counts, probs, dy)
    want = _run(seq, x, counts, probs, dy)
    for name, a, b in zip(("output", "grad x", "grad probs"), got, want):
        _check(name, a, b, dtype)
    g1, g2 = h.sequential_grads_as_grouped(seq, num, hidden)
    assert grouped.weight1.grad is not None and grouped.weight2.grad is not None, \
        "every expert weight needs a gradient, even with zero tokens"
    _check("grad weight1", grouped.weight1.grad.view(num, hidden, -1), g1, dtype)
    _check("grad weight2", grouped.weight2.grad.view(num, -1, hidden), g2, dtype)
    for e, c in enumerate(counts.tolist()):
        if c == 0:  # an expert without tokens gets an exact zero gradient
            assert torch.equal(grouped.weight1.grad.view(num, hidden, -1)[e], torch.zeros_like(g1[e]))
            assert torch.equal(grouped.weight2.grad.view(num, -1, hidden)[e], torch.zeros_like(g2[e]))


def _starve(layer, experts):
    """Make the router never pick `experts`: feature 0 of every token is a constant 3 and those
    experts' router rows have -5 there (logit ~ -15 against ~ 0 for the others)."""
    with torch.no_grad():
        layer.router.weight[list(experts), 0] = -5.0


# alltoall everywhere; allgather for a few cases (its experts see the same thing).
LAYER_CASES = [pytest.param(num, topk, glu, disp, id=f"E{num}-top{topk}-{'glu' if glu else 'noglu'}-{disp}")
               for num, topk, glu, disp in
               [(n, k, g, "alltoall") for n in (1, 4, 8) for k in (1, 2) for g in (True, False) if k <= n]
               + [(n, k, True, "allgather") for n in (4, 8) for k in (1, 2)]]


@pytest.mark.parametrize("num,topk,glu,dispatcher", LAYER_CASES)
def test_moe_layer_matches_sequential_mlp(num, topk, glu, dispatcher):
    """Whole MoELayer (router, dispatcher, experts): Megatron's own local spec with
    moe_grouped_gemm=True (patched) against the same spec with SequentialMLP."""
    config = h.make_config(experts=num, topk=topk, glu=glu, dispatcher=dispatcher)
    torch.manual_seed(2)
    grouped_layer = h.moe_layer(config, grouped=True)
    seq_layer = h.moe_layer(config, grouped=False)
    assert type(seq_layer.experts).__name__ == "SequentialMLP"
    assert type(grouped_layer.experts).__name__ in ("GroupedMLP", "GmmGroupedMLP")
    starved = list(range(num - 2, num)) if num == 8 else [num - 1] if num == 4 else []
    _starve(seq_layer, starved)
    with torch.no_grad():
        grouped_layer.router.weight.copy_(seq_layer.router.weight)
    h.copy_sequential_to_grouped(seq_layer.experts, grouped_layer.experts)

    seq_len, batch, hidden = 6, 2, config.hidden_size
    x = torch.randn(seq_len, batch, hidden)
    x[..., 0] = 3.0
    dy = torch.randn(seq_len, batch, hidden)
    results = []
    for layer in (grouped_layer, seq_layer):
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        (out * dy).sum().backward()
        results.append((out, xi.grad, layer.router.weight.grad))
    for name, a, b in zip(("output", "grad x", "grad router"), *results):
        _check(name, a, b, torch.float32)
    g1, g2 = h.sequential_grads_as_grouped(seq_layer.experts, num, hidden)
    experts = grouped_layer.experts
    _check("grad weight1", experts.weight1.grad.view(num, hidden, -1), g1, torch.float32)
    _check("grad weight2", experts.weight2.grad.view(num, -1, hidden), g2, torch.float32)
    for e in starved:  # the router really starved them, and their gradients are exact zeros
        assert experts.weight1.grad.view(num, hidden, -1)[e].abs().max() == 0
        assert g1[e].abs().max() == 0


def test_moe_apply_probs_on_input_matches():
    seq, grouped = _pair(4, True, torch.float32, moe_router_topk=1, moe_apply_probs_on_input=True)
    counts = torch.tensor(COUNTS[4])
    x, probs, dy = torch.randn(10, 16), torch.rand(10), torch.randn(10, 16)
    for name, a, b in zip(("output", "grad x", "grad probs"), _run(grouped, x, counts, probs, dy),
                          _run(seq, x, counts, probs, dy)):
        _check(name, a, b, torch.float32)


def test_activation_recompute_matches():
    extra = dict(recompute_granularity="selective", recompute_modules=["moe_act"])
    seq, grouped = _pair(4, True, torch.float32, **extra)
    assert grouped.activation_recompute
    counts = torch.tensor(COUNTS[4])
    x, probs, dy = torch.randn(10, 16), torch.rand(10), torch.randn(10, 16)
    got, want = _run(grouped, x, counts, probs, dy), _run(seq, x, counts, probs, dy)
    for name, a, b in zip(("output", "grad x", "grad probs"), got, want):
        _check(name, a, b, torch.float32)


def _autograd_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [n for n, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bias_activation_fusion_matches(dtype):
    """bias_activation_fusion (Megatron-LM's default with --swiglu): on 0.17+ the plugin's experts
    use Megatron's fused weighted SwiGLU, as TEGroupedMLP and SequentialMLP do (the legacy class
    keeps its own activation); outputs and gradients match SequentialMLP's either way."""
    seq, grouped = _pair(4, True, dtype, bias_activation_fusion=True)
    counts = torch.tensor(COUNTS[4])
    x, probs, dy = torch.randn(10, 16).to(dtype), torch.rand(10), torch.randn(10, 16)
    got, want = _run(grouped, x, counts, probs, dy), _run(seq, x, counts, probs, dy)
    for name, a, b in zip(("output", "grad x", "grad probs"), got, want):
        _check(name, a, b, dtype)
    if not patches.version_rules().legacy_grouped_mlp:
        assert "WeightedSwiGLUFunctionBackward" in _autograd_nodes(got[0])


def test_state_dict_round_trips():
    config = h.make_config(experts=4)
    torch.manual_seed(3)
    a = h.build_grouped(4, config)
    torch.manual_seed(4)
    b = h.build_grouped(4, config)
    assert not torch.equal(a.weight1, b.weight1)
    sd = a.state_dict()
    # 0.12-0.16: the legacy GroupedMLP's keys; 0.17+: SequentialMLP's (tests/patches/test_checkpoint_layout.py)
    weights = {k for k in sd if not k.endswith("_extra_state")}
    if h.version()[:2] < (0, 17):
        assert weights == {"weight1", "weight2"}
    else:
        assert weights == {f"local_experts.{e}.linear_fc{i}.weight" for e in range(4) for i in (1, 2)}
    b.load_state_dict(sd)
    counts, x, probs = torch.tensor(COUNTS[4]), torch.randn(10, 16), torch.rand(10)
    assert torch.equal(a(x, counts, probs)[0], b(x, counts, probs)[0])
    assert all(torch.equal(sd[k], v) for k, v in b.state_dict().items() if torch.is_tensor(v))


@pytest.mark.skipif(h.version()[:2] >= (0, 17), reason="grouped_gemm_util exists up to 0.16")
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_util_ops_gmm_is_a_counts_gmm(trans_b):
    """Code that still calls Megatron's gg.ops.gmm(a, b, batch_sizes, trans_b) gets the plugin."""
    from reference import gmm_reference  # tests/reference.py (tests/ is on sys.path via conftest)
    from megatron.core.transformer.moe import grouped_gemm_util as gg
    assert gg.grouped_gemm_is_available()
    gg.assert_grouped_gemm_is_available()
    counts = torch.tensor(COUNTS[4])
    a = torch.randn(10, 8, dtype=torch.float64).float()
    w = torch.randn(4, 8, 6, dtype=torch.float64).float()
    b = w.transpose(-1, -2).contiguous() if trans_b else w
    got = gg.ops.gmm(a, b, counts, trans_b=trans_b)
    want = gmm_reference(a, w, counts.tolist())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _megatron_test_grouped_mlp():
    """The GroupedMLP experts of Megatron's own test_grouped_mlp.py (0.12-0.16), on the CPU."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, num_moe_experts=2,
                               use_cpu_initialization=True, add_bias_linear=False, gated_linear_unit=True,
                               activation_func=F.silu, bias_activation_fusion=False, bf16=True,
                               params_dtype=torch.bfloat16, moe_router_load_balancing_type="sinkhorn",
                               moe_router_topk=1)
    return h.build_grouped(2, config)


@pytest.mark.skipif(h.version()[:2] >= (0, 17), reason="grouped_gemm_util exists up to 0.16")
def test_megatron_gmm_with_no_tokens_allocated():
    """Megatron's own test_grouped_mlp.py::test_gpu_forward_with_no_tokens_allocated (core_v0.12.1
    to 0.16.1), on the CPU: its GroupedMLP config, then gg.ops.gmm on 0 tokens with float zeros as
    batch_sizes and weight1.view(E, -1, hidden) (K does not match): grouped_gemm's first check
    refuses all-zero batch_sizes with this exact message, and Megatron's test accepts only that."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg
    experts = _megatron_test_grouped_mlp()
    w1 = experts.weight1.view(2, -1, 16)
    hidden_states = torch.rand((0, 16), dtype=torch.bfloat16)
    with pytest.raises(ValueError) as e:
        gg.ops.gmm(hidden_states, w1, torch.zeros(2), trans_b=False)
    assert str(e.value) == "Input batch_sizes should not be all zeros!"


@pytest.mark.skipif(h.version()[:2] >= (0, 17), reason="GroupedMLP exists up to 0.16")
def test_megatron_gradient_with_no_tokens_allocated():
    """Megatron's own test_grouped_mlp.py::test_gradient_with_no_tokens_allocated (core_v0.12.1 to
    0.16.1), on the CPU: the patched GroupedMLP on 0 tokens with float zeros as tokens_per_expert
    (GroupedMLP only asserts they are all zero) gives an empty output and weight gradients (zeros);
    float counts that are not all zero are refused, naming tokens_per_expert."""
    experts = _megatron_test_grouped_mlp()
    hidden_states = torch.rand((0, 16), dtype=torch.bfloat16)
    probs = torch.rand((0,), dtype=torch.float32)
    out, _ = experts(hidden_states, torch.zeros(2), probs)
    assert out.shape == (0, 16)
    out.mean().backward()
    for w in (experts.weight1, experts.weight2):
        assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w.grad))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        experts(hidden_states, torch.tensor([0.0, 1.0]), probs)


@pytest.mark.skipif(h.version()[:2] >= (0, 17), reason="grouped_gemm_util exists up to 0.16")
def test_grouped_gemm_util_ops_gmm_contract():
    """After the all-zero check, grouped_gemm's: 1-D integer counts (int64; int32 widened), the
    shapes checked; a bad argument is a TypeError / ValueError naming it."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg
    a, b = torch.randn(10, 8), torch.randn(4, 8, 6)
    counts = torch.tensor(COUNTS[4])
    torch.testing.assert_close(gg.ops.gmm(a, b, counts.to(torch.int32)), gg.ops.gmm(a, b, counts))
    with pytest.raises(TypeError, match="batch_sizes"):
        gg.ops.gmm(a, b, counts.float())
    with pytest.raises(TypeError, match="batch_sizes"):
        gg.ops.gmm(a, b, COUNTS[4])
    with pytest.raises(TypeError, match="trans_b"):
        gg.ops.gmm(a, b, counts, trans_b=1)
    with pytest.raises(ValueError, match="K"):
        gg.ops.gmm(a, b, counts, trans_b=True)
    with pytest.raises(ValueError, match="group_list"):  # the counts must cover a's rows
        gg.ops.gmm(a, b, torch.tensor([3, 0, 5, 1]))
