"""The gmm-plugin command: info, check-config, bench delegation; `python -m gmm_plugin`."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from gmm_plugin import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def fresh_settings(monkeypatch):
    """Settings read from the environment again, as in a new process; put back afterwards."""
    from gmm_plugin import settings
    before = settings.configure()
    settings.reset()
    yield monkeypatch
    settings.configure(before)


def test_info(capsys, fresh_settings):
    fresh_settings.delenv("GMM_PLUGIN_BACKEND", raising=False)
    had_torch_npu = "torch_npu" in sys.modules
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    for word in ("gmm-plugin", "torch ", "torch_npu", "megatron-core", "devices:", "backends:", "reference",
                 "auto picks:"):
        assert word in out
    assert "cpu tensors -> torch" in out or "cuda/cpu tensors -> torch" in out
    assert ("torch_npu" in sys.modules) == had_torch_npu  # info never imports torch_npu by itself


def test_info_reports_a_forced_backend(capsys, fresh_settings):
    fresh_settings.setenv("GMM_PLUGIN_BACKEND", "reference")
    rc, out, _ = run(capsys, "info")
    assert rc == 0 and "reference for every device (forced by GMM_PLUGIN_BACKEND)" in out


def test_info_with_the_torch_npu_double(capsys):
    import torch_npu_double
    with torch_npu_double.installed():
        rc, out, _ = run(capsys, "info")
    assert rc == 0 and "ready: torch_npu 2.9.0 [test double], group_type 2, fusion via npu_grouped_matmul_add_" in out


def test_check_config_ok(capsys, monkeypatch):
    monkeypatch.setenv("GMM_PLUGIN_GEMM_FUSION", "0")
    rc, out, err = run(capsys, "check-config", os.path.join(ROOT, "configs", "gmm_npu.yaml"))
    assert rc == 0 and err == ""
    assert "backend: npu" in out and "gemm_fusion: false" in out  # environment applied
    rc, out, _ = run(capsys, "check-config", "--no-env", os.path.join(ROOT, "configs", "gmm_npu.yaml"))
    assert rc == 0 and "gemm_fusion: true" in out


@pytest.mark.parametrize("text, words", [("backnd: torch\n", ["unknown key 'backnd'", "did you mean 'backend'?"]),
                                         ("backend: [\n", ["malformed YAML", "line"]),
                                         ("gemm_fusion: maybe\n", ["'gemm_fusion'", "true or false"])])
def test_check_config_bad_file_exits_2(capsys, tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    rc, out, err = run(capsys, "check-config", "--no-env", str(path))
    assert rc == 2 and out == ""
    assert str(path) in err and all(w in err for w in words)


def test_check_config_missing_file(capsys, tmp_path):
    rc, _, err = run(capsys, "check-config", str(tmp_path / "none.yaml"))
    assert rc == 2 and "not found" in err


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["nope"], ["check-config"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_bench_delegates_its_arguments(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("gmm_plugin.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "gmm_plugin.bench", fake)
    assert cli.main(["bench", "--suite", "gmm", "--help"]) == 0
    assert seen == [["--suite", "gmm", "--help"]]


def test_bench_missing_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gmm_plugin.bench", None)  # import of it fails as if absent
    rc, _, err = run(capsys, "bench")
    assert rc == 2 and "gmm_plugin.bench is not part of this installation" in err


def test_python_dash_m(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("enabled: 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GMM_PLUGIN_")}
    proc = subprocess.run([sys.executable, "-m", "gmm_plugin", "check-config", str(bad)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "'enabled' must be true or false" in proc.stderr
