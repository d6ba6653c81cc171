"""The `gmm-plugin` command (also `python -m gmm_plugin`).

    gmm-plugin info                  versions, devices, backends, what `auto` picks
    gmm-plugin check-config PATH     validate a YAML config and print the resolved values (exit 2 if bad)
    gmm-plugin bench [ARGS...]       the benchmark table (gmm_plugin.bench)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

EXIT_BAD_INPUT = 2


def _dist_version(name: str) -> str | None:
    """Installed version from package metadata, without importing the package."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _info_lines(import_npu: bool = False) -> list[str]:
    import torch

    import gmm_plugin
    from gmm_plugin import settings
    from gmm_plugin.backends import aclnn, npu
    from gmm_plugin.config import ENV_VARS

    lines = [f"gmm-plugin     {gmm_plugin.__version__}",
             f"python         {sys.version.split()[0]}",
             f"torch          {torch.__version__}"]
    npu_version = _dist_version("torch_npu") or _dist_version("torch-npu")
    loaded = "torch_npu" in sys.modules
    lines.append(f"torch_npu      {npu_version or 'not installed'}"
                 + ("" if not npu_version else " (imported)" if loaded else " (installed, not imported)"))
    lines.append(f"megatron-core  {_dist_version('megatron-core') or 'not installed'}")

    lines.append("devices:")
    lines.append(f"  cpu          {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"  cuda         {torch.cuda.device_count()} ({names})")
    else:
        lines.append("  cuda         none")
    if loaded and hasattr(torch, "npu"):
        lines.append(f"  npu          {torch.npu.device_count()}")
    else:
        lines.append("  npu          unknown (torch_npu not imported)" if npu_version else "  npu          none")

    lines.append("backends:")
    lines.append("  reference    available (per-group torch.mm loop)")
    native = "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "per-group loop (no torch._grouped_mm)"
    lines.append(f"  torch        available on cpu/cuda ({native})")
    lines.append(f"  npu          {npu.status(import_module=import_npu)}")
    lines.append(f"  aclnn        {aclnn.status()}")

    lines += _mindspeed_lines()

    forced = settings.current().backend
    if forced != "auto":
        env = os.environ.get(ENV_VARS["backend"], "").strip().lower()
        src = ENV_VARS["backend"] if env == forced else "gmm_plugin.settings"
        lines.append(f"auto picks:    {forced} for every device (forced by {src})")
    else:
        lines.append("auto picks:    npu tensors -> npu, cuda/cpu tensors -> torch, others -> reference")
    return lines


def _mindspeed_lines() -> list[str]:
    """MindSpeed / MindSpeed-LLM beside the plugin: installed?, the `mindspeed` mode, and, when the
    patches are applied in this process, whose experts and whose GMM run (patches.report())."""
    import importlib.util

    from gmm_plugin.config import ConfigError, load_config
    lines = ["mindspeed:"]
    for name, dist in (("mindspeed", "mindspeed"), ("mindspeed_llm", "mindspeed_llm")):
        found = name in sys.modules or importlib.util.find_spec(name) is not None
        version = _dist_version(dist) or _dist_version(dist.replace("_", "-"))
        state = "not installed" if not found else \
            f"{version or 'source tree'} ({'imported' if name in sys.modules else 'installed, not imported'})"
        lines.append(f"  {name:<13} {state}")
    try:
        mode = load_config().mindspeed
    except ConfigError as e:
        mode = f"invalid ({e})"
    what = {"defer": "experts MindSpeed replaced run as MindSpeed has them (MindSpeed's GMM)",
            "gmm": "MindSpeed's own GroupedMLP experts run on gmm-plugin's GMM (grouped_gemm_util.ops)"}
    lines.append(f"  mode          {mode}: {what.get(mode, '')}".rstrip(": "))
    patches = sys.modules.get("patches")
    current = getattr(patches, "report", None)
    rep = current() if callable(current) else None
    if rep is not None:
        lines.append(f"  now           experts: {rep.experts}; GMM: {rep.gmm}")
    return lines


def _check_config(path: str, use_env: bool) -> int:
    from gmm_plugin.config import ConfigError, describe, load_config

    try:
        cfg = load_config(path, env=None if use_env else {})
    except ConfigError as e:
        print(f"gmm-plugin check-config: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(describe(cfg))
    return 0


def _bench(argv: list[str]) -> int:
    try:  # lazily: the benchmark pulls in its own timing and table code
        bench = importlib.import_module("gmm_plugin.bench")
    except ModuleNotFoundError as e:
        if e.name != "gmm_plugin.bench":
            raise
        print("gmm-plugin bench: the benchmark module gmm_plugin.bench is not part of this installation.",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return bench.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmm-plugin", description="MindSpeed-compatible grouped matmul plugin.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices, backends, and what 'auto' picks")
    info.add_argument("--import-npu", action="store_true",
                      help="import torch_npu to check the npu backend (needs CANN; off by default)")
    check = sub.add_parser("check-config", help="validate a YAML config and print the resolved values")
    check.add_argument("path", metavar="PATH", help="YAML file (bare keys, or under a 'gmm_plugin:' section)")
    check.add_argument("--no-env", action="store_true", help="ignore GMM_PLUGIN_* environment variables")
    sub.add_parser("bench", help="grouped-matmul benchmark table (options: gmm-plugin bench --help)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark's own parser
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print("\n".join(_info_lines(import_npu=args.import_npu)))
        return 0
    return _check_config(args.path, use_env=not args.no_env)


if __name__ == "__main__":
    sys.exit(main())
