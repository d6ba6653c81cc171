"""MindSpeed (and MindSpeed-LLM) beside gmm-plugin, against the MindSpeed double
(tests/mindspeed_double, built from the real patch mechanism; see its docstrings): every import
order, both `mindspeed` modes, MindSpeed's own experts on the plugin's GMM against SequentialMLP
from the same weights (forward, dx, dW, main_grad with --gemm-gradient-accumulation-fusion). One
subprocess per case: MindSpeed patches Megatron at import."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import mindspeed_cases as mc  # noqa: E402
import patches  # noqa: E402

DOUBLE = os.path.join(mc.ROOT, "tests", "mindspeed_double")
LEGACY = patches.version_rules().legacy_grouped_mlp


@pytest.mark.skipif(not LEGACY, reason="megatron-core 0.17+ has no GroupedMLP / grouped_gemm_util (see the modern cases)")
@pytest.mark.parametrize("case", mc.LEGACY, ids=[c[0] for c in mc.LEGACY])
def test_mindspeed_double_legacy(case):
    mc.check(case, mc.run_case(case, [DOUBLE]))


@pytest.mark.skipif(LEGACY, reason="megatron-core < 0.17: MindSpeed core_r0.17.0 / core_r0.18.0 cases need 0.17+")
@pytest.mark.parametrize("case", mc.MODERN, ids=[c[0] for c in mc.MODERN])
def test_mindspeed_double_modern(case):
    r = mc.run_case(case, [DOUBLE])
    mc.check(case, r)
    if case[0] == "r018-rejects-moe-grouped-gemm":
        # why grouped_experts exists: MindSpeed core_r0.18.0 refuses --moe-grouped-gemm after parsing
        assert r["mindspeed_validate"].startswith("NotImplementedError: MindSpeed --moe-grouped-gemm")
    elif "r018" in case[0] or "llm" in case[0]:
        assert r["mindspeed_validate"] == "ok"  # no --moe-grouped-gemm: MindSpeed's checks pass
    if case[0].startswith("r017"):
        assert any("never reads" in n for n in r["report"]["notes"]), r["report"]["text"]
        assert r["compare"]["fused_into_main_grad"]  # the plugin's gemm_fusion into main_grad


def test_mindspeed_detection_sees_wrappers_and_mindspeed_llm(monkeypatch):
    """functools.wraps wrappers report the wrapped function's __module__; the code's file tells."""
    import functools
    import sys
    import types

    from patches import _from_mindspeed
    path = os.path.join(DOUBLE, "mindspeed_llm", "zero_experts_moe_layer.py")
    module = types.ModuleType("mindspeed_llm.core.fake")
    module.__file__ = path
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def original(self):
        return None
    code = compile("def wrapper_factory(fn):\n    @functools.wraps(fn)\n    def wrapper(*a, **k):\n"
                   "        return fn(*a, **k)\n    return wrapper\n", path, "exec")
    ns = {"functools": functools}
    exec(code, ns)
    wrapped = ns["wrapper_factory"](original)
    assert wrapped.__module__ == original.__module__  # what the old prefix test looked at
    assert _from_mindspeed(wrapped) == "mindspeed_llm.core.fake"
    assert _from_mindspeed(functools.partial(wrapped)) == "mindspeed_llm.core.fake"
    assert _from_mindspeed(original) is None
    cls = type("X", (), {"__module__": "mindspeed_llm.models"})
    assert _from_mindspeed(type("Y", (cls,), {})) == "mindspeed_llm.models"
    assert _from_mindspeed(type("Z", (), {"__module__": "mindspeedx.models"})) is None  # a prefix is not enough


def test_revert_restores_only_where_the_plugins_object_still_is():
    from patches._patching import PatchSet
    owner = types_namespace(ops=None, f="orig")
    ps = PatchSet()
    ps.set(owner, "ops", "plugin")
    ps.set(owner, "f", "plugin_f")
    owner.ops = "mindspeed"  # MindSpeed patched over ours after the plugin
    assert not ps.holds(owner, "ops") and ps.holds(owner, "f")
    kept = ps.restore()
    assert owner.ops == "mindspeed" and owner.f == "orig" and kept == ["ns.ops"]


def types_namespace(**kw):
    import types
    ns = types.ModuleType("ns")
    vars(ns).update(kw)
    return ns


def test_mindspeed_key_flag_env_and_errors():
    import argparse

    from gmm_plugin.config import ConfigError, load_config
    parser = patches.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--gmm-plugin-mindspeed", "gmm", "--gmm-plugin-grouped-experts"])
    cfg = patches.config_from_args(args, env={})
    assert cfg.mindspeed == "gmm" and cfg.grouped_experts is True
    assert patches.config_from_args(parser.parse_args([]), env={}).mindspeed == "defer"
    assert load_config(None, env={"GMM_PLUGIN_MINDSPEED": "GMM"}).mindspeed == "gmm"
    assert patches.config_from_args(parser.parse_args(["--gmm-plugin-mindspeed", "defer"]),
                                    env={"GMM_PLUGIN_MINDSPEED": "gmm"}).mindspeed == "defer"  # flag over env
    with pytest.raises(ConfigError, match="GMM_PLUGIN_MINDSPEED.*'mindspeed' must be one of defer, gmm"):
        load_config(None, env={"GMM_PLUGIN_MINDSPEED": "mindspeed"})
    with pytest.raises(ConfigError, match="'mindspeed' must be one of defer, gmm.*did you mean 'defer'"):
        load_config({"mindspeed": "defr"}, env={})
    with pytest.raises(SystemExit):
        parser.parse_args(["--gmm-plugin-mindspeed", "on"])


def test_adaptor_keeps_mindspeeds_flag_whenever_mindspeed_is_installed(monkeypatch):
    """MindSpeed reads sys.argv when it is imported, which may be after the adaptor (MindSpeed-LLM's
    pretrain_gpt.py:10): installed is enough to keep --gemm-gradient-accumulation-fusion (39daed2
    looked only at sys.modules, patches/megatron_adaptor.py:37, and stripped it)."""
    import importlib.util

    from patches import megatron_adaptor
    argv = ["--gemm-gradient-accumulation-fusion", "--gmm-plugin-mindspeed", "gmm", "--gmm-plugin-grouped-experts",
            "--bf16"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "mindspeed" else real(name, *a))
    assert patches.mindspeed_installed() == ["mindspeed"]
    _, rest = megatron_adaptor.enable_from_argv(argv)
    assert rest == ["--gemm-gradient-accumulation-fusion", "--bf16"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("mindspeed") else real(name, *a))
    _, rest = megatron_adaptor.enable_from_argv(argv)
    assert rest == ["--bf16"]
