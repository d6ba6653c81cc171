"""Megatron-core integration of gmm-plugin: route the MoE grouped-MLP experts through npu_gmm_v2.

    import patches
    report = patches.apply("configs/gmm_cpu.yaml")   # or a GmmPluginConfig, a mapping, or None
    print(report)
    patches.revert()                                  # every original object back

Training scripts: `import patches.megatron_adaptor` (reads --use-gmm-plugin,
--gmm-plugin-config PATH and --gemm-gradient-accumulation-fusion from sys.argv), or pass
`patches.add_arguments` as Megatron's extra_args_provider and call
`patches.apply(patches.config_from_args(args))`.

Supported: megatron-core 0.12.x to 0.16.x (the legacy GroupedMLP is patched in place) and 0.17.x
to 0.19.x (plugin-backed grouped experts replace the SequentialMLP fallback of
moe_grouped_gemm=True). Anything else is an UnsupportedMegatronVersion error and nothing is patched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ._patching import PatchSet, define_missing_te_general_gemm

__all__ = ["apply", "revert", "is_applied", "active_config", "add_arguments", "config_from_args", "PatchReport",
           "UnsupportedMegatronVersion", "megatron_version", "version_rules", "VersionRules", "grouped_mlp_class",
           "SUPPORTED"]

logger = logging.getLogger("gmm_plugin.patches")
# megatron-core, version by version: what the experts patch must do the way Megatron does it.
# The one table of version facts; everything else asks version_rules(). (Checked in the
# NVIDIA/Megatron-LM history and the 0.12.1 / 0.16.1 / 0.19.2 sources.)
SUPPORTED = ((0, 12), (0, 20))  # [0.12.0, 0.20.0)
_MODERN = (0, 17)                # GroupedMLP and grouped_gemm_util removed (2caa681a1d, 0.17.0)
_TP_ATTRIBUTES_ALWAYS = (0, 18)  # Column/RowParallelLinear set tensor_model_parallel, partition_dim and
                                 # partition_stride also when perform_initialization=False (a72c0278e6)
_EXPERT_PGS_WHEN_ETP_DIFFERS = (0, 19)  # expert weights allreduce=False also when ETP != TP, so DDP
                                        # reduces them over expert DP (cd4afffa64); before: only EP > 1


@dataclass(frozen=True)
class VersionRules:
    """What the installed megatron-core does with its own experts (see the table above)."""
    version: tuple[int, int, int]
    legacy_grouped_mlp: bool          # GroupedMLP + grouped_gemm_util exist (<= 0.16): patched in place
    tp_attributes_always: bool        # TP attributes whatever perform_initialization says (>= 0.18)
    expert_pgs_when_etp_differs: bool  # allreduce = not (EP > 1 or ETP != TP) (>= 0.19), else not EP > 1

    def expert_allreduce(self, config) -> bool:
        """The `allreduce` attribute of an expert weight: False puts it in DDP's expert-parallel
        buffers (reduced over expert DP), True in the dense ones (reduced over DP)."""
        expert_pgs = config.expert_model_parallel_size > 1
        if self.expert_pgs_when_etp_differs:
            expert_pgs = expert_pgs or config.expert_tensor_parallel_size != config.tensor_model_parallel_size
        return not expert_pgs


def version_rules(version: tuple[int, int, int] | None = None) -> VersionRules:
    """The rules for `version` (default: the installed megatron-core)."""
    v = tuple(megatron_version() if version is None else version)
    return VersionRules(v, v[:2] < _MODERN, v[:2] >= _TP_ATTRIBUTES_ALWAYS, v[:2] >= _EXPERT_PGS_WHEN_ETP_DIFFERS)


class UnsupportedMegatronVersion(RuntimeError):
    """megatron-core is missing or outside the versions the experts patch knows."""


@dataclass
class PatchReport:
    megatron_version: str | None
    experts: str                  # "legacy GroupedMLP", "GmmGroupedMLP", or why not patched
    patched: list[str] = field(default_factory=list)
    cpu_shim: bool = False
    mindspeed: str | None = None  # what MindSpeed had patched, when it had
    config: object = None

    def __str__(self) -> str:
        cfg = self.config
        lines = [f"gmm-plugin patches: megatron-core {self.megatron_version}; experts: {self.experts}"]
        lines += [f"  patched {name}" for name in self.patched]
        if self.mindspeed:
            lines.append(f"  MindSpeed: {self.mindspeed}")
        lines.append(f"  cpu shim: {'on' if self.cpu_shim else 'off'}")
        if cfg is not None:
            lines.append(f"  config ({cfg.source or 'defaults'}): backend={cfg.backend} "
                         f"group_list_form={cfg.group_list_form} gemm_fusion={cfg.gemm_fusion} "
                         f"check_group_list={cfg.check_group_list} fused_wgrad_dtype={cfg.fused_wgrad_dtype}")
        return "\n".join(lines)


_patches = PatchSet()
_report: PatchReport | None = None
_shim_ours = False
_settings_before = None  # the operator settings before the first apply(), put back by revert()


def megatron_version() -> tuple[int, int, int]:
    """The installed megatron-core version as (major, minor, micro)."""
    try:
        import megatron.core as mcore
    except ImportError as e:
        raise UnsupportedMegatronVersion(f"megatron-core is not installed ({e}); the experts patch needs "
                                         "megatron-core 0.12 to 0.19 (pip install 'gmm-plugin[megatron]').") from None
    from packaging.version import InvalidVersion, Version
    raw = getattr(mcore, "__version__", None)
    try:
        release = Version(str(raw)).release
    except InvalidVersion:
        raise UnsupportedMegatronVersion(f"cannot read the megatron-core version ({raw!r}).") from None
    return tuple((release + (0, 0, 0))[:3])


def _check_version(version: tuple[int, int, int]) -> None:
    if not SUPPORTED[0] <= version[:2] < SUPPORTED[1]:
        raise UnsupportedMegatronVersion(
            f"megatron-core {'.'.join(map(str, version))} is not supported by the gmm-plugin experts patch "
            "(supported: 0.12.0 to 0.19.x; tested: 0.12.1, 0.16.1, 0.19.2). Nothing was patched.")


def _resolve_config(config):
    from gmm_plugin.config import GmmPluginConfig, load_config
    return config if isinstance(config, GmmPluginConfig) else load_config(config)


def _from_mindspeed(obj) -> str | None:
    """The mindspeed module behind obj (a class anywhere in its MRO, a function, a namespace)."""
    candidates = list(getattr(obj, "__mro__", ())) or [obj]
    if not isinstance(obj, type):
        candidates.append(type(obj))
        candidates += [v for v in vars(obj).values() if callable(v)] if hasattr(obj, "__dict__") else []
    for c in candidates:
        module = getattr(c, "__module__", None) or ""
        if module == "mindspeed" or module.startswith("mindspeed."):
            return module
    return None


def _mindspeed_patches(targets: dict[str, object]) -> str | None:
    found = [f"{name} -> {mod}" for name, obj in targets.items() if (mod := _from_mindspeed(obj))]
    return "; ".join(found) or None


def _legacy_targets():
    from megatron.core.transformer.moe import experts, grouped_gemm_util as gg
    return experts, gg, {"megatron.core.transformer.moe.experts.GroupedMLP": experts.GroupedMLP,
                         "GroupedMLP.forward": experts.GroupedMLP.forward,
                         "megatron.core.transformer.moe.grouped_gemm_util.ops": gg.ops}


def _modern_targets():
    from megatron.core.transformer.moe import experts, moe_layer
    return experts, moe_layer, {"megatron.core.transformer.moe.moe_layer.MoELayer.__init__":
                                moe_layer.MoELayer.__init__,
                                "megatron.core.transformer.moe.experts.SequentialMLP": experts.SequentialMLP}


def _patch_experts(version, patches: PatchSet) -> tuple[str, list[str], str | None]:
    from . import experts as ex
    if version_rules(version).legacy_grouped_mlp:
        experts, gg, targets = _legacy_targets()
        mindspeed = _mindspeed_patches(targets)
        if mindspeed:
            return "left to MindSpeed", [], mindspeed
        patches.set(experts.GroupedMLP, "forward", ex.legacy_grouped_mlp_forward)
        patches.set(gg, "grouped_gemm_is_available", ex.grouped_gemm_is_available)
        patches.set(gg, "assert_grouped_gemm_is_available", ex.assert_grouped_gemm_is_available)
        patches.set(gg, "ops", ex.legacy_ops)
        names = ["megatron.core.transformer.moe.experts.GroupedMLP.forward",
                 "megatron.core.transformer.moe.grouped_gemm_util.{grouped_gemm_is_available,"
                 "assert_grouped_gemm_is_available,ops}"]
        if define_missing_te_general_gemm(patches):
            names.append("megatron.core.transformer.moe.moe_utils.te_general_gemm (missing name -> None)")
        return "legacy GroupedMLP", names, None
    experts, moe_layer, targets = _modern_targets()
    mindspeed = _mindspeed_patches(targets)
    if mindspeed:
        return "left to MindSpeed", [], mindspeed
    grouped = grouped_mlp_class()
    patches.set(moe_layer.MoELayer, "__init__",
                ex.wrap_moe_layer_init(moe_layer.MoELayer.__init__, grouped, experts.SequentialMLP))
    return "GmmGroupedMLP", ["megatron.core.transformer.moe.moe_layer.MoELayer.__init__ "
                             "(moe_grouped_gemm=True + SequentialMLP spec -> GmmGroupedMLP)"], None


_grouped_cls = None


def grouped_mlp_class():
    """GmmGroupedMLP for the installed megatron-core 0.17+, for a custom spec too: it needs no
    apply() (it takes active_config() when built; the CPU shim is apply()'s alone)."""
    global _grouped_cls
    if _grouped_cls is None:
        from .experts import make_grouped_mlp_class
        _grouped_cls = make_grouped_mlp_class()
    return _grouped_cls


def _want_shim(cfg) -> bool:
    from . import cpu_platform
    return cfg.cpu_shim == "on" or (cfg.cpu_shim == "auto" and not cpu_platform.accelerator_present())


def apply(config=None) -> PatchReport:
    """Patch Megatron-core's experts per config (a GmmPluginConfig, YAML path, mapping or None).

    Idempotent: a second call only switches to the new config (the legacy GroupedMLP's forward
    reads it at call time; GmmGroupedMLP takes the active config when it is built).
    Raises UnsupportedMegatronVersion (nothing patched) for a megatron-core outside 0.12-0.19.
    """
    global _report, _shim_ours, _settings_before
    from . import cpu_platform

    cfg = _resolve_config(config)
    if _report is None:
        version = megatron_version()
        _check_version(version)
        patches = _patches  # empty here: nothing is applied
        try:
            if cfg.enabled:
                experts_path, names, mindspeed = _patch_experts(version, patches)
            else:
                experts_path, names, mindspeed = "not patched (enabled: false)", [], None
        except BaseException:
            patches.restore()
            raise
        _report = PatchReport(".".join(map(str, version)), experts_path, names, mindspeed=mindspeed)
        if mindspeed:
            logger.warning("gmm-plugin: MindSpeed already patched Megatron's experts (%s); gmm-plugin "
                           "leaves them to MindSpeed and patches nothing there.", mindspeed)
        first = True
    elif cfg.enabled == _report.experts.startswith("not patched"):
        # Switching `enabled` on or off: start over, so the experts follow it.
        revert()
        return apply(cfg)
    else:
        first = False
    try:
        previous = cfg.apply_runtime()
        if first:  # the operator settings are process-wide: revert() puts these back
            _settings_before = previous
        if _want_shim(cfg):
            if not cpu_platform.is_enabled():
                _shim_ours = cpu_platform.enable(force=cfg.cpu_shim == "on")
        elif _shim_ours:
            cpu_platform.disable()
            _shim_ours = False
    except BaseException:
        if first:  # never leave a first apply half done
            revert()
        raise
    _report.cpu_shim = cpu_platform.is_enabled()
    _report.config = cfg
    return _report


def is_applied() -> bool:
    return _report is not None


def active_config():
    """The GmmPluginConfig of the last apply(), or the defaults (with GMM_PLUGIN_* from the
    environment) when the plugin is not applied: what the experts take their settings from."""
    if _report is not None and _report.config is not None:
        return _report.config
    from gmm_plugin.config import load_config
    return load_config()


def revert() -> None:
    """Undo apply(): every patched attribute, the runtime settings and our CPU shim."""
    global _report, _shim_ours, _settings_before
    from . import cpu_platform
    if _shim_ours:
        cpu_platform.disable()
        _shim_ours = False
    _patches.restore()
    if _settings_before is not None:
        from gmm_plugin import settings
        settings.configure(_settings_before)
        _settings_before = None
    from gmm_plugin import fusion
    fusion.release_dummies()  # the DDP dummy gradients of the patched experts' fused backward
    _report = None


def add_arguments(parser):
    """Megatron extra_args_provider: --use-gmm-plugin, --gmm-plugin-config, and MindSpeed's
    --gemm-gradient-accumulation-fusion (skipped when MindSpeed registered it already)."""
    group = parser.add_argument_group(title="gmm-plugin")
    taken = set(getattr(parser, "_option_string_actions", {}))
    options = (
        ("--use-gmm-plugin", dict(action="store_true", default=False,
                                  help="Route MoE grouped-MLP experts through gmm-plugin (npu_gmm_v2).")),
        ("--gmm-plugin-config", dict(type=str, default=None, metavar="PATH",
                                     help="gmm-plugin YAML config (see configs/gmm_default.yaml).")),
        ("--gemm-gradient-accumulation-fusion", dict(action="store_true", default=None,
                                                     help="Accumulate expert weight gradients into main_grad "
                                                          "(MindSpeed's flag; gmm-plugin's gemm_fusion).")),
    )
    for flag, kwargs in options:
        if flag not in taken:
            group.add_argument(flag, **kwargs)
    return parser


def config_from_args(args, env=None):
    """The GmmPluginConfig a parsed command line asks for (flags override YAML and environment)."""
    from gmm_plugin.config import load_config
    overrides = {
        "enabled": True if getattr(args, "use_gmm_plugin", False) else None,
        "gemm_fusion": True if getattr(args, "gemm_gradient_accumulation_fusion", None) else None,
    }
    return load_config(getattr(args, "gmm_plugin_config", None), env=env, overrides=overrides)
