#!/usr/bin/env python
"""Run Megatron-LM's pretrain_gpt.py (or another Megatron training script) with gmm-plugin,
without editing it:

    torchrun --nproc-per-node 8 examples/megatron_lm_launch.py $MEGATRON_LM/pretrain_gpt.py \
        <Megatron-LM flags> --moe-grouped-gemm --use-gmm-plugin [--gmm-plugin-config PATH]

The same as making `import patches.megatron_adaptor` the first line of that script: the adaptor
reads --use-gmm-plugin / --gmm-plugin-config / --gmm-plugin-mindspeed / --gmm-plugin-grouped-experts /
--gemm-gradient-accumulation-fusion, patches Megatron-core's experts, and removes its flags before
Megatron parses the rest (MindSpeed's --gemm-gradient-accumulation-fusion stays when MindSpeed is
installed: a script such as MindSpeed-LLM's pretrain_gpt.py imports MindSpeed after this). Without those
flags Megatron's own experts run.

On a machine without a GPU or NPU the launcher also turns on patches.cpu_platform's training
shim (gloo, Megatron's training loop on the CPU) and adds the flags a CPU run cannot do without
(CPU_FLAGS; it says so in one line); a flag that asks for what a CPU lacks is refused up front.

multiprocessing's 'spawn' children (torch_dist saving starts one) re-import the main module: the
launcher makes that module itself, so a child gets typing.override on Python 3.11 before the
script's imports, then the script's module level as it would without the launcher.
"""
import importlib.machinery
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from patches import cpu_platform  # noqa: E402

# Megatron-core 0.19's training code imports typing.override (Python >= 3.12): in this process
# and in every spawned child, which runs this module first.
cpu_platform.ensure_typing_override()

SCRIPT_ENV = "GMM_PLUGIN_LAUNCH_SCRIPT"  # the script a spawned child re-imports after us
MODULE_NAME = "megatron_lm_launch"      # how a spawned child finds this file (HERE on sys.path)

# Flags added on a CPU machine when absent: (flag, value or None, why).
CPU_FLAGS = (
    ("--distributed-backend", "gloo", "NCCL needs GPUs"),
    ("--transformer-impl", "local", "Transformer Engine needs CUDA"),
    ("--no-persist-layer-norm", None, "Apex's persistent layer norm is CUDA-only"),
    ("--no-gradient-accumulation-fusion", None, "APEX's fused_weight_gradient_mlp_cuda is CUDA-only"),
    ("--no-rope-fusion", None, "Transformer Engine's fused RoPE is CUDA-only"),
    ("--no-masked-softmax-fusion", None, "Megatron's scaled_masked_softmax_cuda kernel (16-bit) is CUDA-only"),
)


def _value_of(argv, flag):
    """(present, value) of a flag in argv ('--f v' or '--f=v'; value None for a bare flag)."""
    for i, arg in enumerate(argv):
        if arg == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            return True, None if nxt is None or nxt.startswith("--") else nxt
        if arg.startswith(flag + "="):
            return True, arg.split("=", 1)[1]
    return False, None


def cpu_flags(argv):
    """argv with CPU_FLAGS added where absent, and the added flags. SystemExit (naming the flag)
    when argv asks for a value a CPU run cannot have."""
    added = []
    for flag, value, why in CPU_FLAGS:
        present, given = _value_of(argv, flag)
        if not present:
            added += [flag] if value is None else [flag, value]
        elif value is not None and given != value:
            sys.exit(f"{os.path.basename(__file__)}: {flag} {given} cannot run on this machine "
                     f"(no GPU/NPU; {why}): use {flag} {value} or leave it out.")
    return argv + added, added


def _usage():
    sys.exit(f"usage: {os.path.basename(sys.argv[0])} PATH/TO/pretrain_gpt.py [Megatron-LM flags] "
             "[--use-gmm-plugin] [--gmm-plugin-config PATH]")


def _run_as_main(script, argv):
    """Run `script` as __main__ the way `python script` would (its __file__, its globals), but
    with a __spec__ naming this launcher, so that multiprocessing's spawn children import the
    launcher (then the script) as their main module instead of the bare script."""
    os.environ[SCRIPT_ENV] = script
    if HERE not in sys.path:
        sys.path.append(HERE)  # last: it must shadow nothing the script imports
    import types
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
    main.__spec__ = importlib.machinery.ModuleSpec(MODULE_NAME, None)
    main.__builtins__ = __builtins__
    with open(script, "rb") as f:
        code = compile(f.read(), script, "exec")
    launcher_main = sys.modules["__main__"]
    sys.modules.setdefault(MODULE_NAME, launcher_main)
    sys.modules["__main__"] = main
    sys.argv = [script, *argv]
    try:
        exec(code, main.__dict__)
    finally:
        sys.modules["__main__"] = launcher_main


def main():
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py") or not os.path.isfile(sys.argv[1]):
        _usage()
    script = os.path.abspath(sys.argv[1])
    sys.path.insert(0, os.path.dirname(script))  # the script's own imports (megatron/, gpt_builders, ...)

    import patches.megatron_adaptor  # noqa: F401  (applies the plugin when asked, strips its flags from sys.argv)

    argv = sys.argv[2:]
    if not cpu_platform.accelerator_present():
        argv, added = cpu_flags(argv)
        cpu_platform.enable_training()
        if os.environ.get("RANK", "0") == "0":
            print(f"{os.path.basename(__file__)}: no GPU/NPU: Megatron's training loop runs on the CPU "
                  f"(patches.cpu_platform); added {' '.join(added) or 'no flags'}", flush=True)
    _run_as_main(script, argv)


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__" and os.environ.get(SCRIPT_ENV):
    # A spawned child: the script's module level, as the child of a bare `python script` runs it.
    globals().update(runpy.run_path(os.environ[SCRIPT_ENV], run_name="__mp_main__"))
