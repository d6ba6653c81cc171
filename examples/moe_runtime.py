"""Where the MoE pretraining example runs: the device, the process group, the plugin, RNG state.

The device is picked automatically (cuda/nccl, npu/hccl, else cpu/gloo). On a CPU, Megatron runs
through gmm-plugin's CPU platform shim (patches.cpu_platform).
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings

import numpy
import torch

from gmm_plugin.config import SECTION as PLUGIN_SECTION

DIST_BACKEND = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

# Megatron's notices about optional packages this example does not use (Apex, Transformer
# Engine, CUDA graphs, absl), about the classes the plugin patches, and torch's deprecation of a
# collective Megatron calls.
_KNOWN_NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                  "full scope is deprecated", "The legacy GroupedMLP will be deprecated",
                  "GPTModel IS DEPRECATED", "MimoModelConfig is experimental", "absl.logging is not installed",
                  "`torch.distributed.all_gather_into_tensor` is deprecated")


def quiet_known_notices() -> None:
    for message in _KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=".*" + message)


def pick_device(requested: str) -> str:
    if requested in ("auto", "npu"):
        try:
            import torch_npu  # noqa: F401
            if torch.npu.is_available():
                # Megatron-core calls torch.cuda.* and uses device="cuda"; Ascend's own adapter
                # maps those to the NPU (what MindSpeed relies on too).
                from torch_npu.contrib import transfer_to_npu  # noqa: F401
                return "npu"
        except Exception:  # no torch_npu, or no CANN runtime under it
            pass
        if requested == "npu":
            raise SystemExit("--device npu: torch_npu is not importable or no NPU is visible")
    if requested in ("auto", "cuda"):
        if torch.cuda.is_available():
            return "cuda"
        if requested == "cuda":
            raise SystemExit("--device cuda: no CUDA device is visible")
    return "cpu"


def prepare_device(device: str, cpu_threads: int) -> None:
    if device != "cpu":
        return
    # Megatron wraps a few small functions in torch.compile (@jit_fuser); none is on this
    # example's hot path, and compiling them costs seconds per process on a CPU.
    import torch._dynamo
    torch._dynamo.config.disable = True
    if cpu_threads:
        torch.set_num_threads(cpu_threads)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str, ep: int) -> tuple[int, int]:
    """The process group (a one-process group under plain `python`) and Megatron's parallel
    state (tensor and pipeline parallel 1, expert parallel ep); returns (rank, world size)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    elif device == "npu":
        torch.npu.set_device(local_rank)
    dist.init_process_group(DIST_BACKEND[device], rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                             expert_model_parallel_size=ep)
    return rank, world


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def enable_plugin(args, preset: dict, device: str, log):
    """Turn on the CPU shim (always on a CPU) and, with --use-gmm-plugin, the experts patch;
    returns the plugin's resolved config, or None without the flag.

    Plugin settings: --gmm-plugin-config PATH if given, else the preset's own `gmm_plugin:`
    section, else the plugin's defaults; GMM_PLUGIN_* variables and the flags override them.
    """
    import patches
    from patches import cpu_platform

    if device == "cpu":
        cpu_platform.enable()
    if not args.use_gmm_plugin:
        return None
    if args.gmm_plugin_config is None and preset.get(PLUGIN_SECTION) is not None:
        args.gmm_plugin_config = args.config
    report = patches.apply(patches.config_from_args(args))
    for line in str(report).splitlines():
        log(line)
    return report.config


def optimizer_context(device: str):
    """Megatron's optimizer creates tensors on "cuda" by name; on a CPU the shim maps them."""
    from patches import cpu_platform
    return cpu_platform.cuda_literals_on_cpu() if device == "cpu" else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    from megatron.core import tensor_parallel
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def rng_state(device: str) -> dict:
    from megatron.core import tensor_parallel
    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    elif device == "npu":
        state["npu"] = torch.npu.get_rng_state()
    return state


def set_rng_state(state: dict, device: str) -> None:
    from megatron.core import tensor_parallel
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if device == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    elif device == "npu":
        torch.npu.set_rng_state(state["npu"])


def mcore_version() -> str:
    try:
        import megatron.core
        return megatron.core.__version__
    except Exception:
        return "?"
