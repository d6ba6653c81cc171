"""Which megatron-core the patch tests run against, and the supported range."""
from __future__ import annotations

import os

import pytest

import patches


@pytest.mark.megatron
def test_the_matrix_run_uses_the_requested_megatron_core():
    pytest.importorskip("megatron.core")
    expected = os.environ.get("GMM_EXPECT_MCORE")
    got = ".".join(map(str, patches.megatron_version()))
    if expected:
        assert got == expected, f"PYTHONPATH should have selected megatron-core {expected}, got {got}"
    assert patches.SUPPORTED[0] <= patches.megatron_version()[:2] < patches.SUPPORTED[1]


def test_no_megatron_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(patches.UnsupportedMegatronVersion, match="megatron-core is not installed"):
        patches.megatron_version()


@pytest.mark.parametrize("version,legacy,tp_always,etp_rule", [
    ((0, 12, 1), True, False, False), ((0, 16, 1), True, False, False), ((0, 17, 1), False, False, False),
    ((0, 18, 0), False, True, False), ((0, 19, 0), False, True, True), ((0, 19, 2), False, True, True)])
def test_version_rules_follow_megatrons_history(version, legacy, tp_always, etp_rule):
    """2caa681a1d (GroupedMLP removed) is in core_v0.17.0, a72c0278e6 (TP attributes without
    initialisation) first in core_v0.18.0, cd4afffa64 (the ETP != TP allreduce rule) first in
    core_v0.19.0 (git merge-base --is-ancestor on NVIDIA/Megatron-LM)."""
    rules = patches.version_rules(version)
    assert (rules.legacy_grouped_mlp, rules.tp_attributes_always, rules.expert_pgs_when_etp_differs) == \
        (legacy, tp_always, etp_rule)


@pytest.mark.parametrize("tp,etp,ep", [(1, 1, 1), (2, 1, 1), (2, 2, 1), (1, 2, 1), (1, 1, 2), (2, 1, 2)])
def test_expert_allreduce_is_megatrons_rule(tp, etp, ep):
    """ColumnParallelLinear(is_expert=True).weight.allreduce per version: `not (is_expert and
    expert_parallel)` up to 0.18, `not (EP > 1 or ETP != TP)` from 0.19 (tensor_parallel/layers.py)."""
    import types
    config = types.SimpleNamespace(tensor_model_parallel_size=tp, expert_tensor_parallel_size=etp,
                                   expert_model_parallel_size=ep)
    assert patches.version_rules((0, 18, 2)).expert_allreduce(config) == (ep == 1)
    assert patches.version_rules((0, 19, 2)).expert_allreduce(config) == (ep == 1 and etp == tp)
