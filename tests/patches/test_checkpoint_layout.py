"""GmmGroupedMLP's checkpoints are SequentialMLP's (megatron-core 0.17+), and the legacy
GroupedMLP's stay Megatron's own (0.12-0.16).

Ground truth: Megatron's SequentialMLP built from the same weights. Compared: state_dict keys,
dtypes, values; sharded_state_dict after Megatron's apply_factories: every ShardedTensor's key,
dtype, local and global shape, global offset, axis fragmentations, replica id and values, every
ShardedObject's key, offsets and replica id. One process here; 2 and 4 gloo processes under TP,
expert TP, EP and expert DP in checkpoint_cases.layout_phase (with a torch_dist round trip).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import checkpoint_cases as cc  # noqa: E402
import checkpoint_helpers as ch  # noqa: E402
import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
from gmm_plugin import torch_caps  # noqa: E402

MODERN = h.version()[:2] >= (0, 17)
modern_only = pytest.mark.skipif(not MODERN, reason="GmmGroupedMLP exists on megatron-core 0.17+")
needs_psutil = pytest.mark.skipif(ch.psutil_path() is None,
                                  reason="psutil is not installed: torch_dist saving would hang (pip install psutil)")


@pytest.fixture(autouse=True)
def plugin():
    patches.revert()
    patches.apply({"backend": "torch"})
    h.ensure_world()
    yield
    patches.revert()


def _pair(experts=4, glu=True, dtype=torch.float32, seed=0):
    config = h.make_config(experts=experts, glu=glu, dtype=dtype)
    torch.manual_seed(seed)
    seq = h.build_sequential(experts, config)
    grouped = h.build_grouped(experts, config)
    h.copy_sequential_to_grouped(seq, grouped)
    return seq, grouped


# ----------------------------------------------------------------------------------------------
# torch format


@modern_only
@pytest.mark.parametrize("experts,glu,dtype", [(4, True, torch.float32), (1, False, torch.float32),
                                               (4, False, torch.bfloat16)])
def test_state_dict_is_sequential_mlps(experts, glu, dtype):
    seq, grouped = _pair(experts, glu, dtype)
    assert cc._same_state_dict(grouped.state_dict(), seq.state_dict()) == []
    assert cc._same_state_dict(grouped.state_dict(prefix="mlp.experts."), seq.state_dict(prefix="mlp.experts.")) == []
    # keep_vars: the entries still hang on the parameters (no copies)
    kept = grouped.state_dict(keep_vars=True)["local_experts.0.linear_fc1.weight"]
    assert kept.requires_grad and kept.untyped_storage().data_ptr() == grouped.weight1.untyped_storage().data_ptr()


@modern_only
def test_state_dicts_load_both_ways_and_legacy_keys():
    seq, grouped = _pair(seed=1)
    other_seq, other_grouped = _pair(seed=2)
    assert not torch.equal(other_grouped.weight1, grouped.weight1)
    other_grouped.load_state_dict(seq.state_dict())             # SequentialMLP -> plugin
    assert torch.equal(other_grouped.weight1, grouped.weight1) and torch.equal(other_grouped.weight2, grouped.weight2)
    other_seq.load_state_dict(grouped.state_dict())             # plugin -> SequentialMLP
    assert cc._same_state_dict(other_seq.state_dict(), seq.state_dict()) == []
    _, third = _pair(seed=3)                                     # legacy GroupedMLP keys (<= 0.16 checkpoints)
    third.load_state_dict({"weight1": grouped.weight1.detach().clone(), "weight2": grouped.weight2.detach().clone()})
    assert torch.equal(third.weight1, grouped.weight1) and torch.equal(third.weight2, grouped.weight2)


@modern_only
def test_load_state_dict_reports_bad_checkpoints():
    seq, grouped = _pair()
    sd = seq.state_dict()
    before = grouped.weight1.detach().clone()

    missing = {k: v for k, v in sd.items() if k != "local_experts.2.linear_fc1.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*local_experts\.2\.linear_fc1\.weight"):
        grouped.load_state_dict(missing)
    _, other = _pair(seed=11)
    kept = other.weight1.view(4, 16, -1)[2].detach().clone()
    result = other.load_state_dict(missing, strict=False)   # the other experts load, as SequentialMLP's would
    assert result.missing_keys == ["local_experts.2.linear_fc1.weight"] and result.unexpected_keys == []
    assert torch.equal(other.weight1.view(4, 16, -1)[2], kept)
    assert torch.equal(other.weight1.view(4, 16, -1)[3], grouped.weight1.view(4, 16, -1)[3])
    assert torch.equal(other.weight2, grouped.weight2)

    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*local_experts\.9\.linear_fc1\.weight"):
        grouped.load_state_dict({**sd, "local_experts.9.linear_fc1.weight": sd["local_experts.0.linear_fc1.weight"]})

    wrong = dict(sd, **{"local_experts.1.linear_fc2.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match=r"size mismatch for local_experts\.1\.linear_fc2\.weight"):
        grouped.load_state_dict(wrong)

    with pytest.raises(RuntimeError, match="both the legacy weight1/weight2 keys and SequentialMLP's"):
        grouped.load_state_dict({**sd, "weight1": grouped.weight1.detach()})
    with pytest.raises(RuntimeError, match=r"size mismatch for weight2"):
        grouped.load_state_dict({"weight1": grouped.weight1.detach(), "weight2": torch.zeros(2, 2)})
    assert torch.equal(grouped.weight1, before), "a refused load must leave the weights alone"


@modern_only
def test_load_state_dict_assign_keeps_megatron_attributes():
    seq, grouped = _pair(seed=4)
    _, other = _pair(seed=5)
    other.load_state_dict(seq.state_dict(), assign=True)
    assert torch.equal(other.weight1, grouped.weight1) and torch.equal(other.weight2, grouped.weight2)
    assert isinstance(other.weight1, torch.nn.Parameter) and other.weight1.allreduce == grouped.weight1.allreduce


# ----------------------------------------------------------------------------------------------
# torch_dist (sharded_state_dict)


@modern_only
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("singleton", [False, True])
def test_sharded_state_dict_is_sequential_mlps(glu, singleton):
    seq, grouped = _pair(glu=glu, seed=6)
    for prefix, outer in (("", ()), (cc.PREFIX, cc.OUTER)):
        metadata = {"singleton_local_shards": singleton}
        got = ch.sharded_records(grouped.sharded_state_dict(prefix, outer, dict(metadata)))
        want = ch.sharded_records(seq.sharded_state_dict(prefix, outer, dict(metadata)))
        assert ch.compare_records(got, want) == []


def _factories(sharded):
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    return {k: v for k, v in sharded.items() if isinstance(v, ShardedTensorFactory)}


@modern_only
@pytest.mark.parametrize("glu", [True, False])
def test_optimizer_state_follows_the_weights(glu):
    """Megatron's optimizers wrap a moment with make_sharded_optimizer_tensor(model factory, moment):
    the moment must be written per expert exactly like SequentialMLP's moment of the same values,
    and merging the loaded pieces must give back the stacked tensor."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    seq, grouped = _pair(glu=glu, seed=8)
    g = torch.Generator().manual_seed(9)
    moments = {p: torch.randn(p.shape, generator=g) for p in grouped.parameters()}
    seq_moments = {}
    for e, expert in enumerate(seq.local_experts):   # the same moments, SequentialMLP's layout
        seq_moments[expert.linear_fc1.weight] = moments[grouped.weight1].view(4, 16, -1)[e].t().contiguous()
        seq_moments[expert.linear_fc2.weight] = moments[grouped.weight2].view(4, -1, 16)[e].t().contiguous()

    def optimizer_entries(module, table):
        model = module.sharded_state_dict(cc.PREFIX, cc.OUTER)
        by_param = {id(v.data): v for v in model.values() if hasattr(v, "data") and v.data is not None}
        return {f"{k}": make_sharded_optimizer_tensor(by_param[id(p)], m, prefix="optimizer.state.exp_avg")
                for k, (p, m) in enumerate(table.items())}

    got = ch.sharded_records(optimizer_entries(grouped, moments))
    want = ch.sharded_records(optimizer_entries(seq, seq_moments))
    assert got and ch.compare_records(got, want) == []

    for name, factory in _factories(grouped.sharded_state_dict()).items():
        moment = moments[getattr(grouped, name)]
        opt_factory = make_sharded_optimizer_tensor(factory, moment, prefix="optimizer.state.exp_avg")
        pieces = [sh.data.clone() for sh in opt_factory.build()]
        assert torch.equal(opt_factory.merge_fn(pieces), moment)


@modern_only
def test_flattened_optimizer_shards_are_refused():
    _, grouped = _pair()
    factory = _factories(grouped.sharded_state_dict())["weight1"]
    flat = dataclasses.replace(factory, flattened_range=slice(0, 8))
    with pytest.raises(ValueError, match="flattened ShardedTensors are not supported"):
        flat.build()


# ----------------------------------------------------------------------------------------------
# 2 and 4 gloo processes


@modern_only
@needs_psutil
def test_layout_matches_sequential_mlp_on_2_processes():
    """TP2-ETP1-EP1 (expert DP 2: the replica ids (0,0,0) / (0,0,1) of SequentialMLP), TP1-EP2,
    TP2-ETP2, TP1 (expert DP 2); GLU on/off, singleton_local_shards on/off."""
    run = ch.two_process_run()
    run.check("layout", 4 * 4)


@modern_only
@needs_psutil
def test_layout_matches_sequential_mlp_on_4_processes():
    """TP2-ETP1-EP2 (expert DP 2), TP1-EP2 (expert DP 2), TP2-ETP2 (expert DP 2); a torch_dist
    round trip both ways at TP2-ETP1-EP2."""
    run = ch.run_once("4 processes", 4, ["layout"])
    run.check("layout", 3 * 4 + 1)


# ----------------------------------------------------------------------------------------------
# megatron-core 0.12-0.16: the legacy GroupedMLP keeps Megatron's own checkpoint


@pytest.mark.skipif(MODERN, reason="the legacy GroupedMLP exists up to megatron-core 0.16")
@pytest.mark.parametrize("glu", [True, False])
def test_legacy_grouped_mlp_checkpoint_is_megatrons_own(glu, monkeypatch):
    """The patched class writes what the unpatched class writes (which needs the grouped_gemm
    package to build: its availability check is forced for the unpatched build only)."""
    from megatron.core.transformer.moe import experts, grouped_gemm_util as gg
    config = h.make_config(experts=4, glu=glu)
    torch.manual_seed(10)
    patched = h.build_grouped(4, config)
    assert experts.GroupedMLP.forward is patches.experts.legacy_grouped_mlp_forward
    patched_methods = (experts.GroupedMLP.state_dict, experts.GroupedMLP.sharded_state_dict,
                       experts.GroupedMLP._load_from_state_dict)
    patches.revert()
    assert experts.GroupedMLP.forward is not patches.experts.legacy_grouped_mlp_forward
    monkeypatch.setattr(gg, "assert_grouped_gemm_is_available", lambda: None)
    monkeypatch.setattr(gg, "grouped_gemm_is_available", lambda: True)
    if hasattr(experts, "jit_fuser") and not torch_caps.jit_decorates_methods(experts.jit_fuser):
        # torch < 2.2: megatron-core 0.12's TorchScript jit_fuser cannot build it; a no-op, as the shim does
        monkeypatch.setattr(experts, "jit_fuser", lambda fn: fn)
    torch.manual_seed(10)
    unpatched = h.build_grouped(4, config)
    assert (experts.GroupedMLP.state_dict, experts.GroupedMLP.sharded_state_dict,
            experts.GroupedMLP._load_from_state_dict) == patched_methods
    a, b = patched.state_dict(), unpatched.state_dict()
    assert list(a) == list(b) == ["weight1", "weight2"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    got = ch.sharded_records(patched.sharded_state_dict(cc.PREFIX, cc.OUTER))
    want = ch.sharded_records(unpatched.sharded_state_dict(cc.PREFIX, cc.OUTER))
    assert got and ch.compare_records(got, want) == []
