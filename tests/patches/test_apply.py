"""patches.apply / revert / add_arguments / megatron_adaptor: idempotence, exact revert, the
unsupported-version error with nothing half-applied, MindSpeed detection, the config through the
command line (precedence and errors via gmm_plugin's public config API)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import megatron.core as mcore  # noqa: E402
from megatron.core.transformer.moe import experts as mexperts  # noqa: E402
from megatron.core.transformer.moe import moe_layer, moe_utils  # noqa: E402

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402
from gmm_plugin import settings  # noqa: E402
from gmm_plugin.config import ConfigError  # noqa: E402
from patches import cpu_platform  # noqa: E402
from patches import megatron_adaptor  # noqa: E402  (no plugin flags in pytest's argv: nothing applied)

LEGACY = h.version()[:2] < (0, 17)
MISSING = object()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _targets():
    owners = [(settings, "_process"), (moe_layer.MoELayer, "__init__"),
              (moe_utils, "te_general_gemm"), (mexperts, "GroupedMLP"), (mexperts, "SequentialMLP")]
    if LEGACY:
        from megatron.core.transformer.moe import grouped_gemm_util as gg
        owners += [(mexperts.GroupedMLP, "forward"), (gg, "ops"), (gg, "grouped_gemm_is_available"),
                   (gg, "assert_grouped_gemm_is_available")]
    return owners


def snapshot():
    return {(id(o), n): vars(o).get(n, MISSING) for o, n in _targets()}


@pytest.fixture(autouse=True)
def clean():
    patches.revert()
    before = snapshot()
    shim = cpu_platform.is_enabled()
    yield before
    patches.revert()
    assert snapshot() == before
    assert cpu_platform.is_enabled() == shim


def test_apply_reports_and_revert_restores_everything(clean):
    before_settings = settings.configure(backend="reference")
    try:
        before = snapshot()
        report = patches.apply({"backend": "torch", "cpu_shim": "on"})
        assert patches.is_applied()
        assert report.experts == ("legacy GroupedMLP" if LEGACY else "GmmGroupedMLP")
        assert report.patched and report.megatron_version == ".".join(map(str, h.version()))
        assert report.cpu_shim and cpu_platform.is_enabled()
        assert settings.current().backend == "torch"
        assert snapshot() != before
        assert "experts:" in str(report)
        patches.revert()
        assert not patches.is_applied()
        assert snapshot() == before  # identical objects, backend 'reference' again
        assert settings.current().backend == "reference"
        assert not cpu_platform.is_enabled()
    finally:
        settings.configure(before_settings)


def test_apply_twice_is_idempotent():
    first = patches.apply({"backend": "torch"})
    patched = snapshot()
    second = patches.apply({"backend": "torch", "group_list_form": "cumsum", "gemm_fusion": False})
    assert second is first and snapshot() == patched  # nothing patched twice
    assert patches.active_config().group_list_form == "cumsum" and not patches.active_config().gemm_fusion
    init = moe_layer.MoELayer.__init__
    assert not hasattr(getattr(init, "__wrapped__", None), "__wrapped__"), "MoELayer.__init__ wrapped twice"
    patches.revert()
    patches.revert()  # a second revert is a no-op


def test_disabled_config_patches_no_experts_then_enabling_does(clean):
    report = patches.apply({"enabled": False, "cpu_shim": "off"})
    assert report.experts.startswith("not patched") and not report.patched
    untouched = snapshot()
    assert all(untouched[(id(o), n)] is clean[(id(o), n)] for o, n in _targets()
               if o is not settings)
    report = patches.apply({"enabled": True})
    assert report.patched
    report = patches.apply({"enabled": False, "cpu_shim": "off"})  # and off again: experts restored
    assert not report.patched
    assert all(snapshot()[(id(o), n)] is clean[(id(o), n)] for o, n in _targets()
               if o is not settings)


def test_failure_after_patching_reverts_the_first_apply(monkeypatch, clean):
    monkeypatch.setattr(cpu_platform, "is_enabled", lambda: False)
    monkeypatch.setattr(cpu_platform, "enable", lambda force=False: (_ for _ in ()).throw(RuntimeError("no shim")))
    with pytest.raises(RuntimeError, match="no shim"):
        patches.apply({"cpu_shim": "on"})
    assert not patches.is_applied() and snapshot() == clean


@pytest.mark.parametrize("bad", ["0.11.0", "0.20.0", "1.0.0"])
def test_unsupported_version_is_an_error_and_patches_nothing(monkeypatch, clean, bad):
    monkeypatch.setattr(mcore, "__version__", bad)
    with pytest.raises(patches.UnsupportedMegatronVersion, match=rf"megatron-core {bad}.*supported: 0\.12\.0 to 0\.19"):
        patches.apply()
    assert not patches.is_applied()
    assert snapshot() == clean


def test_failure_midway_leaves_nothing_half_applied(monkeypatch, clean):
    real_set = patches.PatchSet.set
    calls = []

    def failing_set(self, owner, name, value):
        calls.append(name)
        if len(calls) == 3:  # after the two runtime settings, on the first experts patch
            raise RuntimeError("boom")
        return real_set(self, owner, name, value)
    monkeypatch.setattr(patches.PatchSet, "set", failing_set)
    with pytest.raises(RuntimeError, match="boom"):
        patches.apply()
    monkeypatch.undo()
    assert not patches.is_applied() and snapshot() == clean


def test_mindspeed_patched_experts_are_left_alone(monkeypatch, clean):
    fake = types.ModuleType("mindspeed.core.transformer.moe.experts")
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    if LEGACY:
        ms_cls = type("MindSpeedGmmExperts", (mexperts.GroupedMLP,), {"__module__": fake.__name__})
        monkeypatch.setattr(mexperts, "GroupedMLP", ms_cls)
    else:
        original = moe_layer.MoELayer.__init__

        def ms_init(self, *a, **k):
            return original(self, *a, **k)
        ms_init.__module__ = fake.__name__
        monkeypatch.setattr(moe_layer.MoELayer, "__init__", ms_init)
    before = snapshot()
    report = patches.apply({"cpu_shim": "off"})
    assert report.experts == "left to MindSpeed" and not report.patched
    assert "mindspeed.core.transformer.moe.experts" in report.mindspeed and "MindSpeed" in str(report)
    for (o, n) in _targets():
        if o is not settings:
            assert vars(o).get(n, MISSING) is before[(id(o), n)]
    patches.revert()


def test_add_arguments_registers_flags_and_tolerates_mindspeeds():
    parser = argparse.ArgumentParser()
    assert patches.add_arguments(parser) is parser
    args = parser.parse_args(["--use-gmm-plugin", "--gmm-plugin-config", "x.yaml",
                              "--gemm-gradient-accumulation-fusion"])
    assert args.use_gmm_plugin and args.gmm_plugin_config == "x.yaml" and args.gemm_gradient_accumulation_fusion
    defaults = parser.parse_args([])
    assert not defaults.use_gmm_plugin and defaults.gmm_plugin_config is None
    assert defaults.gemm_gradient_accumulation_fusion is None
    ms = argparse.ArgumentParser()
    ms.add_argument("--gemm-gradient-accumulation-fusion", action="store_true")  # MindSpeed's own
    patches.add_arguments(ms)  # no argparse conflict
    assert ms.parse_args(["--gemm-gradient-accumulation-fusion"]).gemm_gradient_accumulation_fusion


def _args(*argv):
    return patches.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_config_precedence_defaults_yaml_env_flags(tmp_path):
    path = tmp_path / "gmm.yaml"
    path.write_text("enabled: false\ngemm_fusion: false\nbackend: reference\ngroup_list_form: cumsum\n")
    cfg = patches.config_from_args(_args("--gmm-plugin-config", str(path)), env={})
    assert (cfg.enabled, cfg.gemm_fusion, cfg.backend, cfg.group_list_form) == (False, False, "reference", "cumsum")
    assert cfg.check_group_list is True  # default kept
    env = {"GMM_PLUGIN_BACKEND": "torch", "GMM_PLUGIN_GEMM_FUSION": "0"}
    cfg = patches.config_from_args(_args("--gmm-plugin-config", str(path)), env=env)
    assert cfg.backend == "torch" and cfg.group_list_form == "cumsum"  # env over YAML
    cfg = patches.config_from_args(_args("--gmm-plugin-config", str(path), "--use-gmm-plugin",
                                         "--gemm-gradient-accumulation-fusion"), env=env)
    assert cfg.enabled and cfg.gemm_fusion  # flags over env and YAML
    assert patches.config_from_args(_args(), env={}).gemm_fusion is True  # default


def test_config_errors_name_the_file_and_key_and_apply_nothing(tmp_path, clean):
    path = tmp_path / "bad.yaml"
    path.write_text("gemm_fusoin: true\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*gemm_fusoin.*did you mean 'gemm_fusion'"):
        patches.apply(patches.config_from_args(_args("--gmm-plugin-config", str(path)), env={}))
    path.write_text("group_list_form: offsets\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*group_list_form"):
        patches.apply(str(path))
    with pytest.raises(ConfigError, match="GMM_PLUGIN_GEMM_FUSION"):
        patches.config_from_args(_args(), env={"GMM_PLUGIN_GEMM_FUSION": "maybe"})
    assert not patches.is_applied() and snapshot() == clean


def test_adaptor_applies_from_argv_and_strips_its_flags(tmp_path):
    path = tmp_path / "cpu.yaml"
    path.write_text("backend: torch\ncpu_shim: 'on'\n")
    argv = ["--num-layers", "2", "--use-gmm-plugin", "--gmm-plugin-config", str(path),
            "--gemm-gradient-accumulation-fusion", "--moe-grouped-gemm"]
    report, rest = megatron_adaptor.enable_from_argv(argv)
    assert report is not None and report.config.backend == "torch" and report.cpu_shim
    assert rest == ["--num-layers", "2", "--moe-grouped-gemm"]
    report, rest = megatron_adaptor.enable_from_argv(["--gmm-plugin-config=" + str(path), "--bf16"])
    assert report is not None and rest == ["--bf16"]
    patches.revert()
    report, rest = megatron_adaptor.enable_from_argv(["--bf16"])
    assert report is None and rest == ["--bf16"] and not patches.is_applied()


def test_import_adaptor_in_a_training_script(tmp_path):
    """The import alone enables the plugin and leaves Megatron a clean argv."""
    script = ("import sys, typing; import patches.megatron_adaptor as a; "
              "print('EXPERTS', a.report.experts); print('ARGV', sys.argv[1:]); "
              "print('OVERRIDE', callable(getattr(typing, 'override', None)))")
    paths = [ROOT] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, "-c", script, "--use-gmm-plugin", "--moe-grouped-gemm"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("EXPERTS legacy GroupedMLP" if LEGACY else "EXPERTS GmmGroupedMLP") in proc.stdout
    assert "ARGV ['--moe-grouped-gemm']" in proc.stdout
    assert "OVERRIDE True" in proc.stdout  # before the script imports 0.19's megatron.training


def test_gemm_fusion_accumulates_into_main_grad_through_the_patch():
    """With main_grad on the weights (what Megatron's DDP provides) and gemm_fusion on, the expert
    weight gradients land in main_grad (twice over two micro-batches) and DDP's protocol flag is set;
    with gemm_fusion off they go to .grad as usual."""
    patches.apply({"backend": "torch", "gemm_fusion": True})
    h.ensure_world()
    module = h.build_grouped(4, h.make_config(experts=4))
    counts = torch.tensor([3, 0, 5, 2])
    x, probs, dy = torch.randn(10, 16), torch.rand(10), torch.randn(10, 16)

    def step():
        out, _ = module(x, counts, probs)
        (out * dy).sum().backward()

    step()
    want1, want2 = module.weight1.grad.clone(), module.weight2.grad.clone()
    for w in (module.weight1, module.weight2):
        w.grad = None
        w.main_grad = torch.zeros_like(w, dtype=torch.float32)
        w.grad_added_to_main_grad = False
    step()
    step()
    for w, want in ((module.weight1, want1), (module.weight2, want2)):
        assert w.grad_added_to_main_grad
        torch.testing.assert_close(w.main_grad, 2 * want, rtol=1e-5, atol=1e-6)
    patches.apply({"backend": "torch", "gemm_fusion": False})
    if not LEGACY:  # GmmGroupedMLP keeps the config it was built with: a new one takes this one
        built_before, module = module, h.build_grouped(4, h.make_config(experts=4))
        module.load_state_dict(built_before.state_dict())
        for w in (module.weight1, module.weight2):
            w.main_grad, w.grad_added_to_main_grad = torch.zeros_like(w, dtype=torch.float32), False
    for w in (module.weight1, module.weight2):
        w.main_grad.zero_()
        w.grad = None
    step()
    assert module.weight1.main_grad.abs().max() == 0
    torch.testing.assert_close(module.weight1.grad, want1)
