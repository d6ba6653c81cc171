"""The plugin's configuration: YAML presets, environment variables and command-line overrides.

    cfg = load_config("configs/gmm_npu.yaml")   # or a mapping, or None for the defaults
    cfg.apply_runtime()                          # the operator settings (gmm_plugin.settings), process-wide

Precedence, lowest first: defaults < YAML (or mapping) < environment (GMM_PLUGIN_*) < overrides
(the training script's flags). A YAML file is either a bare mapping of the keys below or a bigger
file (a training preset) with them under a top-level ``gmm_plugin:`` key; every other top-level
key of such a file belongs to someone else and is ignored. Every error is a ConfigError (a
ValueError) that names where the value came from (file, environment variable) and the key.
"""
from __future__ import annotations

import difflib
import functools
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from . import settings as _settings
from .backends import NAMES as BACKEND_NAMES
from .settings import FUSED_WGRAD_DTYPES, Settings

SECTION = "gmm_plugin"
ENV_PREFIX = "GMM_PLUGIN_"
_CHOICES = {
    "backend": BACKEND_NAMES,
    "group_list_form": ("counts", "cumsum"),
    "cpu_shim": ("auto", "on", "off"),
    "fused_wgrad_dtype": FUSED_WGRAD_DTYPES,
    "mindspeed": ("defer", "gmm"),
}
# Strings parse with settings.py's parser (parse_choice, parse_bool): one rule for every key.


class ConfigError(ValueError):
    """A bad configuration value; the message names the file (or variable) and the key."""


@dataclass(frozen=True)
class GmmPluginConfig:
    enabled: bool = True            # route Megatron's grouped-MLP experts through the plugin
    backend: str = "auto"           # auto | torch | reference | npu
    group_list_form: str = "counts"  # counts (npu_gmm_v2, no cumsum) | cumsum (npu_gmm, parity checks)
    gemm_fusion: bool = True        # accumulate expert wgrad into main_grad when the param has one
    fused_wgrad_dtype: str = "auto"  # auto | fp32 | input: how a fused 16-bit wgrad is computed (settings.py)
    check_group_list: bool = True   # asynchronous device-side group_list assert (host data always checked)
    cpu_shim: str = "auto"          # auto | on | off: Megatron-on-CPU platform shim (patches.cpu_platform)
    mindspeed: str = "defer"        # defer | gmm: beside MindSpeed, leave its experts to it, or run them on the
                                    # plugin's GMM (docs/patches.md#mindspeed)
    grouped_experts: bool = False   # megatron-core 0.17+: GmmGroupedMLP for a SequentialMLP spec even without
                                    # moe_grouped_gemm (MindSpeed core_r0.18.0 rejects --moe-grouped-gemm)
    source: str | None = None       # where it came from, for messages

    def __post_init__(self):
        where = self.source or "GmmPluginConfig"
        for key in KEYS:
            object.__setattr__(self, key, _coerce(key, getattr(self, key), where))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settings(self) -> Settings:
        """The operator library's runtime settings this config asks for."""
        return Settings(backend=self.backend, check_group_list=self.check_group_list,
                        fused_wgrad_dtype=self.fused_wgrad_dtype)

    def apply_runtime(self) -> Settings:
        """Make the operator library follow this config, process-wide; returns the previous settings."""
        from . import settings
        return settings.configure(self.settings())


KEYS = tuple(f.name for f in fields(GmmPluginConfig) if f.name != "source")
ENV_VARS = {key: ENV_PREFIX + key.upper() for key in KEYS}


def load_config(source=None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> GmmPluginConfig:
    """Resolve the config: defaults < source (YAML path or mapping) < env < overrides.

    env defaults to os.environ (pass {} to ignore the environment). In overrides, a value of None
    means "flag not given" and is skipped.
    """
    values: dict[str, Any] = {}
    origin, prefix = None, ""
    if isinstance(source, GmmPluginConfig):
        values, origin = {k: getattr(source, k) for k in KEYS}, source.source
    elif isinstance(source, Mapping):
        origin = "<mapping>"
        values, prefix = _section(source, origin)
    elif isinstance(source, (str, os.PathLike)):
        origin = os.fspath(source)
        values, prefix = _section(read_yaml(origin), origin)
    elif source is not None:
        raise ConfigError(f"config source must be a YAML path, a mapping or None, got {type(source).__name__}.")
    values = {k: _coerce(k, v, origin, prefix) for k, v in values.items()}

    env = os.environ if env is None else env
    for key, var in ENV_VARS.items():
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            values[key] = _from_string(key, raw, f"environment variable {var}")

    if overrides:
        check_known_keys(overrides, KEYS, "overrides")
        for key, value in overrides.items():
            if value is not None:
                values[key] = _coerce(key, value, "overrides")
    return GmmPluginConfig(**values, source=origin)


def read_yaml(path: str):
    """The document in a YAML file (None -> {}), read strictly: a ConfigError naming the file on a
    missing file, malformed YAML or a key given twice."""
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found.")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, expected a YAML config file.")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_strict_loader())
        return {} if data is None else data
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"{path}: malformed YAML: nested too deeply.") from None


@functools.lru_cache(maxsize=None)
def _strict_loader():
    # yaml is imported on first use only, so `import gmm_plugin` stays light.
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that rejects a key given twice (PyYAML silently keeps the last one)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:  # a list or mapping as a key: SafeLoader reports it with its line
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def _section(data, origin: str) -> tuple[dict[str, Any], str]:
    """The plugin's keys (the mapping itself, or its `gmm_plugin:` section) and their key prefix."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: the config must be a mapping of keys to values, got {type(data).__name__}.")
    prefix = ""
    if SECTION in data:
        data, prefix = data[SECTION], SECTION + "."
        if data is None:
            return {}, prefix
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin}: key '{SECTION}' must be a mapping of the plugin's keys, "
                              f"got {type(data).__name__}.")
    nest = f"; a file that configures more than the plugin puts these keys under '{SECTION}:'" \
        if not prefix else ""
    check_known_keys(data, KEYS, origin, prefix, note=nest)
    return dict(data), prefix


def check_known_keys(data: Mapping, known, origin: str, prefix: str = "", note: str = "") -> None:
    """ConfigError for the first key of data not in known, with a did-you-mean and the known keys."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{origin}: unknown key '{prefix}{key}'{hint}. Known keys: "
                              f"{', '.join(known)}{note}.")


def _coerce(key: str, value, where: str | None, prefix: str = "") -> Any:
    """Check one typed value (from YAML, a mapping or overrides); errors name prefix + key."""
    where, label = where or "config", prefix + key
    default = GmmPluginConfig.__dataclass_fields__[key].default
    if key in _CHOICES:
        if isinstance(value, bool) and key == "cpu_shim":
            return "on" if value else "off"  # YAML 1.1 reads a bare `on`/`off` as a bool
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{label}' must be a string, one of {', '.join(_CHOICES[key])}; "
                              f"got {value!r} ({type(value).__name__}).")
        return _choice(key, value, where, label)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{where}: key '{label}' must be true or false, got {value!r} ({type(value).__name__}).")
    return value


def _choice(key: str, value: str, where: str, label: str | None = None) -> str:
    return _settings.parse_choice(value, _CHOICES[key], where, label or key, ConfigError)


def _from_string(key: str, raw: str, where: str) -> Any:
    """Parse one environment variable (settings.py's parser: one rule for every key)."""
    if key in _CHOICES:
        return _choice(key, raw, where)
    return _settings.parse_bool(raw, where, key, ConfigError)


def describe(cfg: GmmPluginConfig) -> str:
    """The resolved config as YAML-like text (for `gmm-plugin check-config`)."""
    lines = [f"# resolved from {cfg.source or 'defaults'} (then GMM_PLUGIN_* environment, then overrides)"]
    for key in KEYS:
        value = getattr(cfg, key)
        lines.append(f"{key}: {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines)


__all__ = ["ConfigError", "GmmPluginConfig", "load_config", "read_yaml", "check_known_keys", "KEYS",
           "ENV_VARS", "describe"]
