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

import functools
import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass, field

from ._patching import PatchSet, define_missing_te_general_gemm

__all__ = ["apply", "revert", "report", "is_applied", "mindspeed_installed", "active_config", "add_arguments", "config_from_args", "PatchReport",
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
    experts: str                  # "legacy GroupedMLP", "GmmGroupedMLP", "left to MindSpeed",
                                  # "MindSpeed's experts on gmm-plugin's GMM", or why not patched
    patched: list[str] = field(default_factory=list)
    cpu_shim: bool = False
    mindspeed: str | None = None  # what MindSpeed / MindSpeed-LLM patched on the experts' path
    config: object = None
    gmm: str = ""                 # whose grouped GEMM the experts run
    notes: list[str] = field(default_factory=list)  # what MindSpeed does that the plugin does not reach

    def __str__(self) -> str:
        cfg = self.config
        lines = [f"gmm-plugin patches: megatron-core {self.megatron_version}; experts: {self.experts}; "
                 f"GMM: {self.gmm}"]
        lines += [f"  patched {name}" for name in self.patched]
        if self.mindspeed:
            mode = f" (mindspeed: {cfg.mindspeed})" if cfg is not None else ""
            lines.append(f"  MindSpeed{mode}: {self.mindspeed}")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  cpu shim: {'on' if self.cpu_shim else 'off'}")
        if cfg is not None:
            lines.append(f"  config ({cfg.source or 'defaults'}): backend={cfg.backend} "
                         f"group_list_form={cfg.group_list_form} gemm_fusion={cfg.gemm_fusion} "
                         f"check_group_list={cfg.check_group_list} fused_wgrad_dtype={cfg.fused_wgrad_dtype} "
                         f"mindspeed={cfg.mindspeed} grouped_experts={cfg.grouped_experts}")
        return "\n".join(lines)


_patches = PatchSet()
_report: PatchReport | None = None
_shim_ours = False
_settings_before = None  # the operator settings before the first apply(), put back by revert()
_generation = 0          # bumped by revert(): a wrapper of ours that someone wrapped over stays inert
announce = False         # print the report again (rank 0) when MindSpeed changes what runs (the adaptor sets it)


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


# ----------------------------------------------------------------------------------------------
# MindSpeed / MindSpeed-LLM beside the plugin (reference/mindspeed-coexistence.md)

_MINDSPEED_PACKAGES = ("mindspeed", "mindspeed_llm")


def _is_mindspeed_module(name) -> bool:
    return isinstance(name, str) and any(name == p or name.startswith(p + ".") for p in _MINDSPEED_PACKAGES)


def _mindspeed_files() -> dict[str, str]:
    """The source file of every loaded mindspeed* module: a functools.wraps wrapper reports the
    wrapped function's __module__, but its code still lives in MindSpeed's file."""
    files = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) if _is_mindspeed_module(name) else None
        if path:
            files[os.path.normcase(os.path.realpath(path))] = name
    return files


def _from_mindspeed(obj, files=None) -> str | None:
    """The mindspeed / mindspeed_llm module behind obj: a class anywhere in its MRO, a function by
    its module or by the file of its code, through functools.wraps (`__wrapped__`) and partials;
    for a namespace (an `ops` object), its type and its callables."""
    files = _mindspeed_files() if files is None else files
    todo, seen = [obj], set()
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, type):
            for c in o.__mro__:
                if _is_mindspeed_module(getattr(c, "__module__", None)):
                    return c.__module__
            continue
        if _is_mindspeed_module(getattr(o, "__module__", None)):
            return o.__module__
        code = getattr(getattr(o, "__func__", o), "__code__", None)
        if code is not None:
            found = files.get(os.path.normcase(os.path.realpath(code.co_filename)))
            if found:
                return found
        todo.append(getattr(o, "__wrapped__", None))
        if isinstance(o, functools.partial):
            todo.append(o.func)
        if code is None and not isinstance(o, types.ModuleType) and hasattr(o, "__dict__"):
            todo.append(type(o))
            todo += [v for v in vars(o).values() if callable(v)]
    return None


def _is_wrapper(obj) -> bool:
    """A decorator-style patch (MindSpeed's `*_wrapper`, patch_utils.py:71,124): it calls the
    original, so it replaced nothing by itself."""
    return getattr(obj, "__wrapped__", None) is not None


def _megatron_base(cls, module: str, name: str):
    """Megatron's own class `name` in cls's MRO (cls may be MindSpeed's subclass of it)."""
    for c in getattr(cls, "__mro__", ()):
        if c.__module__ == module and c.__name__ == name:
            return c
    return None


def _reaches_gg_ops(cls) -> bool:
    """MindSpeed's GmmExpertsImpl.forward looks up grouped_gemm_util.ops.gmm at every call
    (moe_feature/gmm/experts.py:8,73 in 26.0.0_core_r0.12.1); its overlap experts bind their own
    GMMFunction at import and never do."""
    forward = getattr(cls, "forward", None)
    return getattr(forward, "__qualname__", "").startswith("GmmExpertsImpl.")


@dataclass
class _Scan:
    replaced: dict[str, str] = field(default_factory=dict)   # expert-path objects MindSpeed replaced
    wrapped: dict[str, str] = field(default_factory=dict)    # ... or wraps (calls the original)
    gmm: dict[str, str] = field(default_factory=dict)        # grouped_gemm_util names MindSpeed set
    unread: dict[str, str] = field(default_factory=dict)     # names MindSpeed set that Megatron never reads

    def describe(self) -> str | None:
        parts = [f"{n} -> {m}" for n, m in self.replaced.items()]
        parts += [f"{n} wrapped by {m}" for n, m in self.wrapped.items()]
        parts += [f"{n} -> {m}" for n, m in self.gmm.items()]
        parts += [f"{n} -> {m} (never read by this megatron-core)" for n, m in self.unread.items()]
        return "; ".join(parts) or None


def _scan(legacy: bool) -> _Scan:
    """What MindSpeed has put on Megatron's experts path right now."""
    from megatron.core.transformer.moe import experts, moe_layer
    scan = _Scan()
    if not any(_is_mindspeed_module(name) for name in list(sys.modules)):
        return scan
    files = _mindspeed_files()
    base = "megatron.core.transformer.moe."
    path = {base + "moe_layer.MoELayer": moe_layer.MoELayer,
            base + "moe_layer.MoELayer.__init__": moe_layer.MoELayer.__init__}
    if legacy:
        from megatron.core.transformer.moe import grouped_gemm_util as gg
        path[base + "experts.GroupedMLP"] = experts.GroupedMLP
        path[base + "experts.GroupedMLP.forward"] = experts.GroupedMLP.forward
        for name in ("ops", "grouped_gemm_is_available"):
            if (module := _from_mindspeed(getattr(gg, name, None), files)):
                scan.gmm[base + "grouped_gemm_util." + name] = module
    else:
        path[base + "experts.SequentialMLP"] = experts.SequentialMLP
        if (module := _from_mindspeed(vars(experts).get("GroupedMLP"), files)):
            scan.unread[base + "experts.GroupedMLP"] = module  # MindSpeed core_r0.17.0 registers it
    for name, obj in path.items():
        if (module := _from_mindspeed(obj, files)):
            (scan.wrapped if _is_wrapper(obj) and not isinstance(obj, type) else scan.replaced)[name] = module
    return scan


_NOT_REACHED = ("mindspeed: gmm does not reach MindSpeed's overlap experts (--moe-alltoall-overlap-comm, "
                "--moe-allgather-overlap-comm, --moe-fb-overlap, --moe-tp-extend-ep: they bind MindSpeed's "
                "GMMFunction at import) nor its quantised GMM (QAT / fp8, get_gmm_quant_func): those stay "
                "MindSpeed's")


def _ops_owner(ops) -> str:
    from . import experts as ex
    if ops is ex.legacy_ops:
        return "gmm-plugin npu_gmm_v2 via grouped_gemm_util.ops (counts as they are, no cumsum, no host copy)"
    module = _from_mindspeed(ops)
    if module:
        return f"MindSpeed's {module}.Ops.gmm (cumsum + host copy, then npu_gmm)"
    return "grouped_gemm (Megatron's grouped_gemm_util.ops)" if ops is not None else "none (grouped_gemm not installed)"


def _sync(built=None) -> None:
    """Bring the report (and, with mindspeed: gmm, Megatron's grouped_gemm_util.ops) in line with
    what MindSpeed has installed now. Called by apply(), report() and whenever experts are built:
    MindSpeed imported after the plugin is noticed at the latest there. `built`: the experts module
    just built."""
    if _report is None or _report.config is None or not _report.config.enabled:
        return
    from . import experts as ex
    cfg, legacy = _report.config, version_rules().legacy_grouped_mlp
    scan = _scan(legacy)
    before = (_report.experts, _report.gmm)
    notes = []
    if scan.unread:
        notes.append("MindSpeed's experts.GroupedMLP is a name megatron-core 0.17+ never reads: with "
                     "--moe-grouped-gemm (or grouped_experts: true) gmm-plugin's GmmGroupedMLP runs")
    if legacy:
        from megatron.core.transformer.moe import experts, grouped_gemm_util as gg
        cls = type(built) if built is not None else experts.GroupedMLP
        ms_experts = bool(scan.replaced) or _from_mindspeed(cls) is not None
        if ms_experts and cfg.mindspeed == "gmm" and _reaches_gg_ops(cls):
            if gg.ops is not ex.legacy_ops:
                _patches.set(gg, "ops", ex.legacy_ops)  # revert() puts MindSpeed's Ops back
                _report.patched.append("megatron.core.transformer.moe.grouped_gemm_util.ops "
                                       "(over MindSpeed's Ops, for its own experts)")
            experts_now, gmm_now = "MindSpeed's experts on gmm-plugin's GMM", _ops_owner(gg.ops)
            notes.append(_NOT_REACHED)
        elif ms_experts:
            experts_now, gmm_now = "left to MindSpeed", (
                _ops_owner(gg.ops) if _reaches_gg_ops(cls) else f"MindSpeed's own ({cls.__qualname__} binds its GMM)")
            if cfg.mindspeed == "gmm":
                notes.append(f"mindspeed: gmm does not reach {cls.__qualname__}; " + _NOT_REACHED)
        else:
            if scan.gmm and _patches.holds(experts.GroupedMLP, "forward"):
                # MindSpeed imported after the plugin without --moe-grouped-gemm: only its always-on
                # grouped_gemm_util patch; ours back, as when MindSpeed comes first.
                for name in ("grouped_gemm_is_available", "assert_grouped_gemm_is_available", "ops"):
                    if _from_mindspeed(getattr(gg, name)):
                        _patches.set(gg, name, getattr(ex, "legacy_ops" if name == "ops" else name))
            experts_now, gmm_now = "legacy GroupedMLP", "gmm-plugin npu_gmm_v2 (counts as they are)"
            if any(_is_mindspeed_module(name) for name in list(sys.modules)):
                notes.append("MindSpeed is loaded but replaced no experts (without --moe-grouped-gemm only its "
                             "always-on grouped_gemm_util patch, which gmm-plugin's takes over): gmm-plugin's run")
    else:
        if scan.replaced and not (built is not None and _from_mindspeed(type(built)) is None):
            experts_now, gmm_now = "left to MindSpeed", "MindSpeed's"
        else:
            experts_now, gmm_now = "GmmGroupedMLP", "gmm-plugin npu_gmm_v2 (counts as they are)"
        if cfg.mindspeed == "gmm" and scan.describe():
            notes.append("mindspeed: gmm has nothing to reach on megatron-core 0.17+ (no grouped_gemm_util; "
                         "MindSpeed core_r0.18.0 has no grouped-GEMM experts): gmm-plugin's GmmGroupedMLP is "
                         "the grouped path (grouped_experts: true without --moe-grouped-gemm)")
    _report.experts, _report.gmm, _report.mindspeed, _report.notes = experts_now, gmm_now, scan.describe(), notes
    if before != (experts_now, gmm_now) and before != ("", ""):
        logger.warning("gmm-plugin: MindSpeed changed Megatron's experts after gmm-plugin was applied; now: "
                       "experts: %s; GMM: %s (%s)", experts_now, gmm_now, _report.mindspeed)
        if announce and os.environ.get("RANK", "0") == "0":
            print(_report, flush=True)


def _notice_built(module) -> None:
    """Experts were just built (legacy GroupedMLP.__init__ or MoELayer.__init__ wrapper)."""
    try:
        _sync(built=module)
    except Exception:  # a report must never break model building
        logger.exception("gmm-plugin: could not check the experts that were built")


def _hook_init(cls, generation):
    """cls.__init__ that tells the plugin which experts were built (inert after revert())."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if generation == _generation:
            _notice_built(self)

    return __init__


def _legacy_patch(patches: PatchSet, cfg) -> list[str]:
    from megatron.core.transformer.moe import experts, grouped_gemm_util as gg

    from . import experts as ex
    base = "megatron.core.transformer.moe."
    megatron_cls = _megatron_base(experts.GroupedMLP, base[:-1] + ".experts", "GroupedMLP")
    scan = _scan(True)
    names = []
    if scan.replaced and cfg.mindspeed == "defer":
        return names  # MindSpeed's experts, as MindSpeed has them: nothing of ours on their path
    if megatron_cls is not None:
        patches.set(megatron_cls, "__init__", _hook_init(megatron_cls, _generation))
        names.append(base + "experts.GroupedMLP.__init__ (tells the plugin which experts were built)")
    if scan.replaced:  # MindSpeed's experts: defer, or (mindspeed: gmm) _sync() installs the ops
        return names
    patches.set(experts.GroupedMLP, "forward", ex.legacy_grouped_mlp_forward)
    patches.set(gg, "grouped_gemm_is_available", ex.grouped_gemm_is_available)
    patches.set(gg, "assert_grouped_gemm_is_available", ex.assert_grouped_gemm_is_available)
    patches.set(gg, "ops", ex.legacy_ops)  # over MindSpeed's always-on Ops too: it replaced no experts
    names += [base + "experts.GroupedMLP.forward",
              base + "grouped_gemm_util.{grouped_gemm_is_available,assert_grouped_gemm_is_available,ops}"]
    if define_missing_te_general_gemm(patches):
        names.append(base + "moe_utils.te_general_gemm (missing name -> None)")
    return names


def _modern_patch(patches: PatchSet, cfg) -> list[str]:
    from megatron.core.transformer.moe import experts, moe_layer

    from . import experts as ex
    if _scan(False).replaced:
        return []
    generation = _generation
    patches.set(moe_layer.MoELayer, "__init__",
                ex.wrap_moe_layer_init(moe_layer.MoELayer.__init__, grouped_mlp_class(), experts.SequentialMLP,
                                       active=lambda: generation == _generation,
                                       always=lambda: active_config().grouped_experts,
                                       on_built=_notice_built))
    return ["megatron.core.transformer.moe.moe_layer.MoELayer.__init__ "
            "(moe_grouped_gemm=True (or grouped_experts: true) + SequentialMLP spec -> GmmGroupedMLP)"]


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
    reads it at call time; GmmGroupedMLP takes the active config when it is built); a change of
    `enabled` or `mindspeed` starts over. Works whether MindSpeed was imported before or is
    imported after (see _sync). Raises UnsupportedMegatronVersion (nothing patched) for a
    megatron-core outside 0.12-0.19.
    """
    global _report, _shim_ours, _settings_before
    from . import cpu_platform

    cfg = _resolve_config(config)
    if _report is not None and (cfg.enabled != _report.config.enabled or cfg.mindspeed != _report.config.mindspeed):
        revert()  # switching `enabled` or the MindSpeed mode: start over, so the experts follow it
    first = _report is None
    if first:
        version = megatron_version()
        _check_version(version)
        patches = _patches  # empty here: nothing is applied
        try:
            if cfg.enabled:
                legacy = version_rules(version).legacy_grouped_mlp
                names = (_legacy_patch if legacy else _modern_patch)(patches, cfg)
            else:
                names = []
        except BaseException:
            patches.restore()
            raise
        _report = PatchReport(".".join(map(str, version)),
                              "" if cfg.enabled else "not patched (enabled: false)", names, config=cfg,
                              gmm="" if cfg.enabled else "not patched (enabled: false)")
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
        _report.config = cfg
        if first and cfg.enabled:
            _sync()
            if _report.experts == "left to MindSpeed":
                logger.warning("gmm-plugin: MindSpeed already patched Megatron's experts (%s); gmm-plugin "
                               "leaves them to MindSpeed (mindspeed: %s).", _report.mindspeed, cfg.mindspeed)
    except BaseException:
        if first:  # never leave a first apply half done
            revert()
        raise
    _report.cpu_shim = cpu_platform.is_enabled()
    return _report


def report() -> PatchReport | None:
    """The current report (None when not applied), checked again against what MindSpeed has
    installed now: whose experts and whose GMM run."""
    _sync()
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
    """Undo apply(): every patched attribute that still holds the plugin's object (what MindSpeed
    installed over it stays), the runtime settings and our CPU shim. Wrappers of ours that someone
    wrapped over become inert."""
    global _report, _shim_ours, _settings_before, _generation
    from . import cpu_platform
    if _shim_ours:
        cpu_platform.disable()
        _shim_ours = False
    _generation += 1
    kept = _patches.restore()
    if kept:
        logger.info("gmm-plugin revert: left %s as someone else patched it after gmm-plugin", ", ".join(kept))
    if _settings_before is not None:
        from gmm_plugin import settings
        settings.configure(_settings_before)
        _settings_before = None
    from gmm_plugin import fusion
    fusion.release_dummies()  # the DDP dummy gradients of the patched experts' fused backward
    _report = None


def mindspeed_installed() -> list[str]:
    """The MindSpeed packages importable here (whether imported or not)."""
    return [p for p in _MINDSPEED_PACKAGES if p in sys.modules or importlib.util.find_spec(p) is not None]


_FUSION_FLAG = "--gemm-gradient-accumulation-fusion"


def add_arguments(parser):
    """Megatron extra_args_provider: --use-gmm-plugin, --gmm-plugin-config, --gmm-plugin-mindspeed,
    --gmm-plugin-grouped-experts and MindSpeed's --gemm-gradient-accumulation-fusion (skipped
    when MindSpeed registered it already)."""
    group = parser.add_argument_group(title="gmm-plugin")
    taken = set(getattr(parser, "_option_string_actions", {}))
    options = (
        ("--use-gmm-plugin", dict(action="store_true", default=False,
                                  help="Route MoE grouped-MLP experts through gmm-plugin (npu_gmm_v2).")),
        ("--gmm-plugin-config", dict(type=str, default=None, metavar="PATH",
                                     help="gmm-plugin YAML config (see configs/gmm_default.yaml).")),
        ("--gmm-plugin-mindspeed", dict(type=str, default=None, choices=("defer", "gmm"),
                                        help="Beside MindSpeed: defer to its experts, or run them on "
                                             "gmm-plugin's GMM (config key mindspeed).")),
        ("--gmm-plugin-grouped-experts", dict(action="store_true", default=None,
                                              help="megatron-core 0.17+: GmmGroupedMLP also without "
                                                   "--moe-grouped-gemm (config key grouped_experts).")),
        (_FUSION_FLAG, dict(action="store_true", default=None,
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
        "mindspeed": getattr(args, "gmm_plugin_mindspeed", None),
        "grouped_experts": True if getattr(args, "gmm_plugin_grouped_experts", None) else None,
    }
    return load_config(getattr(args, "gmm_plugin_config", None), env=env, overrides=overrides)
