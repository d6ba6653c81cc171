"""`gmm-plugin bench` / `python -m gmm_plugin.bench`: how fast is the grouped matmul, and against what.

Suites (``--suite``), one module each:

* ``gmm`` (ops_suite, fp16_cpu): GMM forward, forward+backward and fused backward (gemm_fusion
  into a DDP-owned fp32 ``main_grad``) for MoE shapes with uneven expert sizes (some empty),
  against one dense ``torch.mm`` of the same FLOPs, a per-group loop and ``torch._grouped_mm``;
  fp16 on a CPU against a dense fp16 ``torch.mm`` timed on a few rows and scaled.
* ``layer`` (layer_suite, megatron_layer): a Megatron-core MoE layer forward+backward with the
  plugin's experts against SequentialMLP built from the same weights, with plain ``.grad`` and
  inside Megatron's own DistributedDataParallel (fp32 main_grad).
* ``cuda`` (cuda_checks, only where CUDA exists): host-sync freedom and the overhead over a direct
  ``torch._grouped_mm``.
* ``example`` (example_suite): the pretraining example's tokens/s with and without the plugin.

The rest: cases (the problems), measure (timing, peak memory, rows), targets, report (header,
table, JSON), chart (PNG), options (the command line), runner (``main``).
"""
from .runner import main

__all__ = ["main"]
