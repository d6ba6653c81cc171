#!/usr/bin/env python
"""Run Megatron-LM's pretrain_gpt.py (or another Megatron training script) with gmm-plugin,
without editing it:

    torchrun --nproc-per-node 8 examples/megatron_lm_launch.py $MEGATRON_LM/pretrain_gpt.py \
        <Megatron-LM flags> --moe-grouped-gemm --use-gmm-plugin [--gmm-plugin-config PATH]

The same as making `import patches.megatron_adaptor` the first line of that script: the adaptor
reads --use-gmm-plugin / --gmm-plugin-config / --gemm-gradient-accumulation-fusion, patches
Megatron-core's experts, and removes its flags before Megatron parses the rest.
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if len(sys.argv) < 2 or not sys.argv[1].endswith(".py") or not os.path.isfile(sys.argv[1]):
    sys.exit(f"usage: {os.path.basename(sys.argv[0])} PATH/TO/pretrain_gpt.py [Megatron-LM flags] "
             "--use-gmm-plugin [--gmm-plugin-config PATH]")
script = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.dirname(script))  # the script's own imports (megatron/, gpt_builders, ...)

import patches.megatron_adaptor  # noqa: E402,F401  (applies the plugin, strips its flags from sys.argv)

sys.argv = sys.argv[1:]  # the training script sees itself as argv[0]
runpy.run_path(script, run_name="__main__")
