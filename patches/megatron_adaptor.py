"""`import patches.megatron_adaptor` at the top of a Megatron training script enables gmm-plugin
from the script's own command line:

    python pretrain_gpt.py ... --moe-grouped-gemm --use-gmm-plugin --gmm-plugin-config configs/gmm_npu.yaml

Flags: --use-gmm-plugin, --gmm-plugin-config PATH (either one enables the plugin; the YAML's
`enabled` decides when only the config is given), --gmm-plugin-mindspeed {defer,gmm},
--gmm-plugin-grouped-experts and MindSpeed's --gemm-gradient-accumulation-fusion (= gemm_fusion:
true). The plugin's own flags are removed from sys.argv so that Megatron's parser does not reject
them. --gemm-gradient-accumulation-fusion stays whenever MindSpeed or MindSpeed-LLM is installed:
MindSpeed reads sys.argv when it is imported, which may be after this module (MindSpeed-LLM's
pretrain_gpt.py imports it on its line 10). Either import order works (patches._sync).
The result of patches.apply() is in `report` (None when the plugin was not asked for).
"""
from __future__ import annotations

import argparse
import os
import sys

import patches as _patches

from . import add_arguments, apply, config_from_args, cpu_platform, mindspeed_installed

# The training script imports megatron.training right after this module; 0.19's uses
# typing.override, which Python < 3.12 lacks (reference/megatron-lm-cpu.md). Accelerator or not.
cpu_platform.ensure_typing_override()

_OURS = ("--use-gmm-plugin", "--gmm-plugin-config", "--gmm-plugin-mindspeed", "--gmm-plugin-grouped-experts")
_TAKES_VALUE = ("--gmm-plugin-config", "--gmm-plugin-mindspeed")
_ALIAS = "--gemm-gradient-accumulation-fusion"


def enable_from_argv(argv: list[str]):
    """Parse our flags out of argv; apply the plugin when asked. Returns (report, remaining argv)."""
    parser = add_arguments(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    args, _ = parser.parse_known_args(argv)
    report = None
    if args.use_gmm_plugin or args.gmm_plugin_config:
        report = apply(config_from_args(args))
        _patches.announce = True  # MindSpeed imported later: the new line is printed when experts are built
        if os.environ.get("RANK", "0") == "0":
            print(report, flush=True)
    strip = _OURS if mindspeed_installed() else _OURS + (_ALIAS,)
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in strip:
            skip = name in _TAKES_VALUE and "=" not in arg
            continue
        rest.append(arg)
    return report, rest


report, _rest = enable_from_argv(sys.argv[1:])
sys.argv[1:] = _rest
