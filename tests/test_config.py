"""gmm_plugin.load_config: presets, precedence, and an error naming file and key for each bad input."""
from __future__ import annotations

import dataclasses
import os

import pytest

import gmm_plugin
from gmm_plugin import Settings, settings
from gmm_plugin.config import ENV_VARS, KEYS, ConfigError, GmmPluginConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["gmm_default", "gmm_npu", "gmm_gpu", "gmm_cpu"]


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_match_the_contract():
    cfg = load_config(env={})
    assert cfg == GmmPluginConfig()
    assert (cfg.enabled, cfg.backend, cfg.group_list_form, cfg.gemm_fusion, cfg.check_group_list, cfg.cpu_shim,
            cfg.source) == (True, "auto", "counts", True, True, "auto", None)
    assert gmm_plugin.load_config is load_config and gmm_plugin.GmmPluginConfig is GmmPluginConfig


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(env={}).backend = "npu"


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    path = os.path.join(ROOT, "configs", name + ".yaml")
    cfg = load_config(path, env={})
    assert cfg.source == path
    assert cfg.backend == {"gmm_default": "auto", "gmm_npu": "npu", "gmm_gpu": "torch", "gmm_cpu": "torch"}[name]


def test_default_preset_documents_every_key_with_its_default():
    text = open(os.path.join(ROOT, "configs", "gmm_default.yaml")).read()
    for key in KEYS:
        assert f"\n{key}:" in text and ENV_VARS[key] in text
    assert load_config(os.path.join(ROOT, "configs", "gmm_default.yaml"), env={}) == \
        dataclasses.replace(GmmPluginConfig(), source=os.path.join(ROOT, "configs", "gmm_default.yaml"))


def test_mapping_and_section(tmp_path):
    assert load_config({"backend": "reference"}, env={}).backend == "reference"
    assert load_config({"gmm_plugin": {"gemm_fusion": False}}, env={}).gemm_fusion is False
    # A training preset: the plugin's keys under gmm_plugin:, other top-level keys ignored.
    path = write(tmp_path, "model:\n  num_layers: 2\ngmm_plugin:\n  backend: torch\n  enabled: false\n")
    cfg = load_config(path, env={})
    assert (cfg.backend, cfg.enabled, cfg.source) == ("torch", False, path)
    assert load_config(write(tmp_path, "gmm_plugin:\n", "s.yaml"), env={}) == \
        dataclasses.replace(GmmPluginConfig(), source=str(tmp_path / "s.yaml"))


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path, "# nothing\n")
    assert load_config(path, env={}) == dataclasses.replace(GmmPluginConfig(), source=path)


def test_precedence_defaults_yaml_env_overrides(tmp_path):
    path = write(tmp_path, "backend: reference\ngemm_fusion: false\ngroup_list_form: cumsum\n")
    cfg = load_config(path, env={})
    assert (cfg.backend, cfg.gemm_fusion, cfg.group_list_form, cfg.check_group_list) == \
        ("reference", False, "cumsum", True)
    env = {"GMM_PLUGIN_BACKEND": "torch", "GMM_PLUGIN_GEMM_FUSION": "1", "GMM_PLUGIN_CHECK_GROUP_LIST": "off"}
    cfg = load_config(path, env=env)
    assert (cfg.backend, cfg.gemm_fusion, cfg.group_list_form, cfg.check_group_list) == \
        ("torch", True, "cumsum", False)
    cfg = load_config(path, env=env, overrides={"backend": "npu", "gemm_fusion": None, "enabled": False})
    assert (cfg.backend, cfg.gemm_fusion, cfg.enabled) == ("npu", True, False)  # None: flag not given


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("GMM_PLUGIN_GROUP_LIST_FORM", "CumSum")
    monkeypatch.setenv("GMM_PLUGIN_ENABLED", "")  # empty: unset
    cfg = load_config()
    assert (cfg.group_list_form, cfg.enabled) == ("cumsum", True)


@pytest.mark.parametrize("value, expected", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                             ("0", False), ("False", False), ("no", False), (" off ", False)])
def test_env_booleans(value, expected):
    assert load_config(env={"GMM_PLUGIN_GEMM_FUSION": value}).gemm_fusion is expected


def test_yaml_bare_on_off_for_cpu_shim(tmp_path):
    # YAML 1.1 reads bare on/off as booleans; cpu_shim takes them as "on"/"off".
    assert load_config(write(tmp_path, "cpu_shim: on\n"), env={}).cpu_shim == "on"
    assert load_config(write(tmp_path, "cpu_shim: off\n"), env={}).cpu_shim == "off"


# ---- errors ------------------------------------------------------------------------------------

def error_of(*args, **kwargs) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    msg = error_of(path)
    assert path in msg and "not found" in msg


def test_directory(tmp_path):
    assert "is a directory" in error_of(str(tmp_path))


@pytest.mark.parametrize("text", ["backend: [torch\n", "backend: torch\n  gemm_fusion: true\n", "a: b: c\n",
                                  "\tbackend: torch\n"])
def test_malformed_yaml(tmp_path, text):
    path = write(tmp_path, text)
    msg = error_of(path)
    assert path in msg and "malformed YAML" in msg and "line" in msg


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "backend: torch\nbackend: npu\n")
    msg = error_of(path)
    assert path in msg and "duplicate key 'backend'" in msg and "line 2" in msg


@pytest.mark.parametrize("text", ["- backend\n- torch\n", "torch\n", "42\n"])
def test_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    assert path in error_of(path) and "mapping" in error_of(path)


def test_unknown_key_did_you_mean(tmp_path):
    path = write(tmp_path, "backnd: torch\n")
    msg = error_of(path)
    assert path in msg and "unknown key 'backnd'" in msg and "did you mean 'backend'?" in msg
    path = write(tmp_path, "gmm_plugin:\n  gemm_fuson: true\n", "s.yaml")
    msg = error_of(path)
    assert path in msg and "'gmm_plugin.gemm_fuson'" in msg and "did you mean 'gmm_plugin.gemm_fusion'?" in msg
    msg = error_of(write(tmp_path, "model: {}\n", "t.yaml"))
    assert "unknown key 'model'" in msg and "under 'gmm_plugin:'" in msg
    assert "did you mean" not in error_of({"zzzz": 1})


def test_errors_in_a_section_name_the_full_key(tmp_path):
    path = write(tmp_path, "gmm_plugin:\n  gemm_fusion: maybe\n  backend: torch\n")
    msg = error_of(path)
    assert path in msg and "key 'gmm_plugin.gemm_fusion' must be true or false" in msg
    msg = error_of({"gmm_plugin": {"backend": "cuda"}})
    assert "<mapping>: key 'gmm_plugin.backend' must be one of" in msg


def test_source_is_not_a_settable_key():
    assert "unknown key 'source'" in error_of({"source": "x"})


@pytest.mark.parametrize("key, value", [("enabled", "yes"), ("enabled", 1), ("gemm_fusion", None),
                                        ("check_group_list", "true"), ("backend", 3), ("backend", True),
                                        ("group_list_form", ["counts"]), ("cpu_shim", 1)])
def test_wrong_types(tmp_path, key, value):
    import yaml
    path = write(tmp_path, yaml.safe_dump({key: value}))
    msg = error_of(path)
    assert path in msg and f"'{key}'" in msg


@pytest.mark.parametrize("key, value, hint", [("backend", "cuda", None), ("backend", "npuu", "npu"),
                                              ("group_list_form", "count", "counts"), ("cpu_shim", "maybe", None)])
def test_bad_values(tmp_path, key, value, hint):
    path = write(tmp_path, f"{key}: {value}\n")
    msg = error_of(path)
    assert path in msg and f"'{key}'" in msg and repr(value) in msg
    assert (f"did you mean '{hint}'?" in msg) if hint else ("did you mean" not in msg)


def test_bad_env_names_the_variable():
    msg = error_of(env={"GMM_PLUGIN_GEMM_FUSION": "maybe"})
    assert "GMM_PLUGIN_GEMM_FUSION" in msg and "'gemm_fusion'" in msg
    msg = error_of(env={"GMM_PLUGIN_BACKEND": "gpu"})
    assert "GMM_PLUGIN_BACKEND" in msg and "'backend'" in msg


def test_bad_overrides():
    assert "overrides: unknown key 'fusion'" in error_of(overrides={"fusion": True})
    assert "overrides: key 'enabled'" in error_of(overrides={"enabled": "no"})


def test_bad_source_type():
    assert "YAML path, a mapping or None" in error_of(3.5)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="'backend'"):
        GmmPluginConfig(backend="gpu")
    assert GmmPluginConfig(backend="NPU").backend == "npu"


def test_apply_runtime_sets_the_settings_in_one_step_and_returns_the_previous():
    before = settings.configure()
    previous = load_config({"backend": "reference", "check_group_list": False, "fused_wgrad_dtype": "input"},
                           env={}).apply_runtime()
    try:
        assert previous == before
        assert settings.current() == Settings(backend="reference", check_group_list=False,
                                              fused_wgrad_dtype="input")
        load_config(env={}).apply_runtime()
        assert settings.current() == Settings()  # the defaults: auto, checks on, auto
    finally:
        settings.configure(before)


def test_fused_wgrad_dtype_from_yaml_and_environment(tmp_path):
    path = write(tmp_path, "fused_wgrad_dtype: INPUT\n")
    assert load_config(path, env={}).fused_wgrad_dtype == "input"
    env = {"GMM_PLUGIN_FUSED_WGRAD_DTYPE": "fp32"}
    assert load_config(path, env=env).fused_wgrad_dtype == "fp32"
    with pytest.raises(ConfigError, match=r"key 'fused_wgrad_dtype' must be one of auto, fp32, input, got 'bf16'"):
        load_config({"fused_wgrad_dtype": "bf16"}, env={})
