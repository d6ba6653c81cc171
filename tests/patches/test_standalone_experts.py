"""GmmGroupedMLP on its own (megatron-core 0.17+): `patches.grouped_mlp_class()` in a custom spec,
without `patches.apply()`. The class takes its settings when it is built: apply()'s config while
the plugin is applied, else the defaults (GMM_PLUGIN_* from the environment included)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron,
              pytest.mark.skipif(__import__("patches").version_rules().legacy_grouped_mlp,
                                 reason="GmmGroupedMLP is the 0.17+ experts class; <= 0.16 patch the legacy GroupedMLP")]

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
from gmm_plugin.config import load_config  # noqa: E402


@pytest.fixture(autouse=True)
def not_applied(monkeypatch):
    for var in ("GMM_PLUGIN_GEMM_FUSION", "GMM_PLUGIN_GROUP_LIST_FORM"):
        monkeypatch.delenv(var, raising=False)
    patches.revert()
    h.ensure_world()
    yield
    patches.revert()


def _custom_spec_layer(config):
    """Megatron's local MoE spec with the experts replaced by the plugin's class (a custom spec)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=True)
    submodules = dataclasses.replace(spec.keywords["submodules"], experts=patches.grouped_mlp_class())
    return spec.func(config=config, submodules=submodules)


@pytest.fixture
def cpu_shim():
    """The dispatcher's torch.cuda streams on a CPU machine (a platform matter, not the experts')."""
    from patches import cpu_platform
    ours = not cpu_platform.is_enabled() and cpu_platform.enable()
    yield
    if ours:
        cpu_platform.disable()


def test_custom_spec_without_apply_matches_sequential_mlp(cpu_shim):
    assert not patches.is_applied()
    config = h.make_config(experts=4)
    torch.manual_seed(5)
    layer = _custom_spec_layer(config)
    assert type(layer.experts).__name__ == "GmmGroupedMLP"
    assert layer.experts.plugin_config == load_config()  # the defaults
    seq = h.build_sequential(4, config)
    h.copy_sequential_to_grouped(seq, layer.experts)
    counts, x, probs = torch.tensor([3, 0, 5, 2]), torch.randn(10, 16), torch.rand(10)
    got, _ = layer.experts(x, counts, probs)
    want, _ = seq(x, counts, probs)
    assert h.rel_err(got, want) <= 1e-5
    out, _ = layer(torch.randn(6, 2, 16))  # and the whole layer (router, dispatcher) runs
    assert out.shape == (6, 2, 16) and not patches.is_applied()


def test_settings_are_taken_when_built(monkeypatch):
    cumsum_calls = []
    real = patches.experts.gmm_ops.npu_gmm
    monkeypatch.setattr(patches.experts.gmm_ops, "npu_gmm", lambda *a, **k: cumsum_calls.append(1) or real(*a, **k))
    config = h.make_config(experts=4)
    patches.apply({"backend": "torch", "group_list_form": "cumsum", "gemm_fusion": False})
    built_applied = patches.grouped_mlp_class()(4, config)
    assert built_applied.plugin_config is patches.active_config()
    patches.apply({"backend": "torch", "group_list_form": "counts"})
    built_after = patches.grouped_mlp_class()(4, config)
    patches.revert()
    built_plain = patches.grouped_mlp_class()(4, config)
    assert (built_applied.plugin_config.group_list_form, built_applied.plugin_config.gemm_fusion) == ("cumsum", False)
    assert built_after.plugin_config.group_list_form == "counts"
    assert built_plain.plugin_config == load_config()
    counts, x, probs = torch.tensor([3, 0, 5, 2]), torch.randn(10, 16), torch.rand(10)
    built_after(x, counts, probs)
    assert not cumsum_calls
    built_applied(x, counts, probs)  # after revert(): still its own settings (v1 form: 2 GEMMs)
    assert len(cumsum_calls) == 2


def test_defaults_follow_the_environment(monkeypatch):
    monkeypatch.setenv("GMM_PLUGIN_GEMM_FUSION", "false")
    module = patches.grouped_mlp_class()(4, h.make_config(experts=4))
    assert module.plugin_config.gemm_fusion is False
