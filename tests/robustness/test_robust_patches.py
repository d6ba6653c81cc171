"""Patch safety as a property: any sequence of patches.apply(random config) and patches.revert()
leaves Megatron exactly as the invariants say. After a revert every attribute of every module and
class under megatron.core.transformer.moe (and torch.cuda, which the CPU shim touches) is the very
object it was before; after an apply the same attributes are patched as after the first apply
(nothing wrapped twice) and the runtime follows the config. tests/patches/test_apply.py pins the
single cases (twice, revert, unsupported or missing Megatron, MindSpeed-patched experts)."""
from __future__ import annotations

import sys

import pytest
from hypothesis import given, strategies as st

from robust_support import count, expect, robust_settings

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import patches  # noqa: E402
from gmm_plugin import Settings, settings  # noqa: E402
from patches import cpu_platform  # noqa: E402

WATCHED = ("megatron.core.transformer.moe", "torch.cuda")


def snapshot() -> dict:
    """(owner, attribute) -> the object there, for every module and class under WATCHED."""
    import megatron.core.transformer.moe.experts  # noqa: F401  (what the patch targets, loaded)
    import megatron.core.transformer.moe.moe_layer  # noqa: F401
    out = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(WATCHED):
            continue
        for attr, value in list(vars(module).items()):
            out[(name, attr)] = value
            if isinstance(value, type) and value.__module__ == name:
                for cattr, cvalue in list(vars(value).items()):
                    out[(f"{name}.{attr}", cattr)] = cvalue
    return out


def changed(before: dict, after: dict) -> set:
    return {k for k in before.keys() | after.keys() if before.get(k, "<missing>") is not after.get(k, "<missing>")}


def megatron_changes(before, after) -> set:
    return {k for k in changed(before, after) if k[0].startswith("megatron.")}


config = st.fixed_dictionaries({
    "enabled": st.booleans(),
    "backend": st.sampled_from(["auto", "torch", "reference"]),
    "group_list_form": st.sampled_from(["counts", "cumsum"]),
    "gemm_fusion": st.booleans(),
    "check_group_list": st.booleans(),
    "cpu_shim": st.sampled_from(["on", "off", "auto"]),
    "fused_wgrad_dtype": st.sampled_from(["auto", "fp32", "input"]),
})
ops = st.lists(st.one_of(st.tuples(st.just("apply"), config), st.tuples(st.just("revert"), st.none())),
               min_size=1, max_size=7)


@pytest.fixture(scope="module")
def pristine():
    """The untouched state, and what the first apply patches with the CPU shim off and on."""
    patches.revert()
    before = snapshot()
    state = (settings.configure(), cpu_platform.is_enabled())
    expected = {}
    for enabled in (True, False):
        for shim in ("off", "on"):
            report = patches.apply({"enabled": enabled, "cpu_shim": shim})
            expected[enabled, cpu_platform.is_enabled()] = (megatron_changes(before, snapshot()), report.experts)
            patches.revert()
            assert not changed(before, snapshot())
    assert expected[True, False][0], "apply patched nothing"
    yield before, state, expected
    patches.revert()


@robust_settings(25)
@given(sequence=ops)
def test_any_apply_revert_sequence_keeps_megatron_consistent(pristine, sequence):
    before, (runtime, shim), expected = pristine
    count("cases_generated")
    try:
        for op, cfg in sequence:
            count("patch_operations")
            if op == "revert":
                patches.revert()
                expect(not patches.is_applied(), "still applied after revert")
                expect(not changed(before, snapshot()), f"revert left {sorted(changed(before, snapshot()))[:5]}")
                expect((settings.configure(), cpu_platform.is_enabled()) == (runtime, shim),
                       "revert did not restore the runtime settings or the CPU shim")
                continue
            report = patches.apply(cfg)
            now = megatron_changes(before, snapshot())
            want, experts = expected[cfg["enabled"], cpu_platform.is_enabled()]
            expect(report.experts == experts and now == want,
                   f"apply({cfg}) patched {sorted(now ^ want)[:5]} differently from a first apply")
            init = getattr(sys.modules["megatron.core.transformer.moe.moe_layer"].MoELayer.__init__,
                           "__wrapped__", None)
            expect(not hasattr(init, "__wrapped__"), "MoELayer.__init__ wrapped twice")
            active = patches.active_config()
            expect(active.backend == cfg["backend"] and active.gemm_fusion == cfg["gemm_fusion"],
                   "the experts do not follow the config")
            expect(settings.current() == Settings(cfg["backend"], cfg["check_group_list"], cfg["fused_wgrad_dtype"]),
                   "the runtime does not follow the config")
            if cfg["cpu_shim"] == "on":
                expect(cpu_platform.is_enabled(), "cpu_shim: on did not enable the shim")
    finally:
        patches.revert()
    expect(not changed(before, snapshot()), "the final revert left patches behind")
