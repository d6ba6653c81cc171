"""Config robustness: any YAML file, mapping or environment either loads into a valid config or
raises ConfigError naming the file (or variable) and, for a bad key or value, the key. Never
another exception, never a silently wrong value. Explicit categories first, then fuzzing."""
from __future__ import annotations

import pytest
import yaml
from hypothesis import given, strategies as st

from gmm_plugin.config import ENV_VARS, KEYS, ConfigError, GmmPluginConfig, load_config
from robust_support import count, expect, robust_settings

CHOICES = {"backend": ("auto", "torch", "reference", "npu", "aclnn"), "group_list_form": ("counts", "cumsum"),
           "cpu_shim": ("auto", "on", "off"), "fused_wgrad_dtype": ("auto", "fp32", "input"),
           "mindspeed": ("defer", "gmm")}
BOOLS = tuple(k for k in KEYS if k not in CHOICES)


def load_error(source, **kw) -> str | None:
    """None when it loads (and is valid); the message of the ConfigError otherwise."""
    kw.setdefault("env", {})
    try:
        cfg = load_config(source, **kw)
    except ConfigError as e:
        count("config_errors")
        return str(e)
    except Exception as e:
        count("crashes")
        raise AssertionError(f"{type(e).__name__} instead of ConfigError: {e}") from e
    assert isinstance(cfg, GmmPluginConfig)
    for key in BOOLS:
        expect(isinstance(getattr(cfg, key), bool), f"{key} = {getattr(cfg, key)!r} is not a bool")
    for key, choices in CHOICES.items():
        expect(getattr(cfg, key) in choices, f"{key} = {getattr(cfg, key)!r} is not one of {choices}")
    return None


def write(tmp_path, text: str | bytes, name="cfg.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize("text, key", [
    ("backend: [torch\n", None),                      # malformed: unclosed flow sequence
    ("backend: torch\n  gemm_fusion: true\n", None),  # malformed: bad indentation
    ("\tenabled: true\n", None),                      # malformed: tab
    ("backend: torch\nbackend: npu\n", "backend"),    # duplicate key
    ("? [a]\n: 1\n", None),                           # unhashable key
    ("{[1]: 2}\n", None),
    ("a: " + "[" * 5000 + "\n", None),                # nested too deeply for PyYAML's recursion
    (b"backend: \xff\xfe\n", None),                   # not UTF-8
    ("backnd: torch\n", "backnd"),                    # unknown keys, with did-you-mean
    ("gmm_plugin:\n  gemm_fuson: true\n", "gmm_plugin.gemm_fuson"),
    ("enabled: 'yes'\n", "enabled"),                  # wrong types
    ("gemm_fusion: 1\n", "gemm_fusion"),
    ("check_group_list: null\n", "check_group_list"),
    ("backend: 3\n", "backend"),
    ("group_list_form: [counts]\n", "group_list_form"),
    ("enabled: 2020-01-01\n", "enabled"),
    ("backend: !!binary aGVsbG8=\n", "backend"),
    ("backend: cuda\n", "backend"),                   # out of range
    ("group_list_form: offsets\n", "group_list_form"),
    ("cpu_shim: maybe\n", "cpu_shim"),
    ("gmm_plugin: [1]\n", "gmm_plugin"),              # a section that is not a mapping
    ("- enabled\n", None),                            # not a mapping at all
    ("!!python/object/apply:os.system ['true']\n", None),  # no code execution: a malformed-YAML error
])
def test_bad_file_is_a_config_error_naming_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    msg = load_error(path)
    expect(msg is not None and path in msg, f"{text!r}: no error naming {path}: {msg}")
    if key is not None:
        expect(f"'{key}'" in msg, f"{text!r}: the error does not name '{key}': {msg}")
    if key in ("backnd", "gmm_plugin.gemm_fuson"):
        expect("did you mean" in msg, f"no did-you-mean suggestion: {msg}")


def test_missing_file_and_directory(tmp_path):
    for path in (str(tmp_path / "missing.yaml"), str(tmp_path)):
        msg = load_error(path)
        expect(msg is not None and path in msg, f"{path}: {msg}")


# ---- fuzzing -------------------------------------------------------------------------------------

scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, width=32),
                   st.text(max_size=8), st.sampled_from(sum(CHOICES.values(), ()) + ("NPU", " torch ", "On")))
value = st.one_of(scalar, st.lists(scalar, max_size=2), st.dictionaries(st.text(max_size=3), scalar, max_size=2))
typo = st.sampled_from(KEYS).map(lambda k: k[:-1]) | st.sampled_from(KEYS).map(lambda k: k.replace("_", ""))
key = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), typo, st.text(min_size=1, max_size=6))


def valid_value(k, v) -> bool:
    if k in BOOLS:
        return isinstance(v, bool)
    if k == "cpu_shim" and isinstance(v, bool):
        return True
    return isinstance(v, str) and v.strip().lower() in CHOICES[k]


@robust_settings(150)
@given(doc=st.dictionaries(key, value, max_size=5), section=st.booleans())
def test_fuzzed_yaml_document(tmp_path_factory, doc, section):
    count("cases_generated")
    path = write(tmp_path_factory.mktemp("cfg"), yaml.safe_dump({"gmm_plugin": doc, "model": {"x": 1}}
                                                                 if section else doc))
    msg = load_error(path)
    unknown = [k for k in doc if k not in KEYS]
    bad = [k for k in doc if k in KEYS and not valid_value(k, doc[k])]
    if not unknown and not bad:
        expect(msg is None, f"valid document {doc} rejected: {msg}")
        return
    expect(msg is not None and path in msg, f"{doc}: no error naming the file: {msg}")
    expect(any(f"'{k}'" in msg or f"'gmm_plugin.{k}'" in msg for k in unknown + bad),
           f"{doc}: the error names none of the bad keys {unknown + bad}: {msg}")


@robust_settings(100)
@given(text=st.one_of(st.text(max_size=60), st.binary(max_size=60),
                      st.text(alphabet=":-[]{}?!&*|>'\"#%@`, \n\tabcdeflnorstu01", max_size=60)))
def test_fuzzed_raw_text(tmp_path_factory, text):
    """Arbitrary bytes in the file: a valid config or a ConfigError naming the file."""
    count("cases_generated")
    path = write(tmp_path_factory.mktemp("raw"), text)
    msg = load_error(path)
    expect(msg is None or path in msg, f"{text!r}: the error does not name the file: {msg}")


@robust_settings(100)
@given(env=st.dictionaries(st.sampled_from(sorted(ENV_VARS.values())),
                           st.one_of(st.text(max_size=8), st.sampled_from(["1", "off", "TRUE", " npu ", "cumsum"])),
                           max_size=4))
def test_fuzzed_environment(env):
    """Bad GMM_PLUGIN_* values name the variable and the key; blank ones are ignored."""
    count("cases_generated")
    msg = load_error(None, env=env)
    if msg is not None:
        expect(any(var in msg and f"'{k}'" in msg for k, var in ENV_VARS.items() if var in env),
               f"{env}: the error names no variable and key: {msg}")
