"""core_r0.17.0's own `mindspeed/core/transformer/moe/grouped_gemm_util.py` (Megatron 0.17 removed
its module): `ops` is MindSpeed's Ops. Imported by moe_feature/__init__.py:63 of core_r0.17.0."""
from mindspeed.core.fusions.grouped_matmul import Ops as ops  # noqa: F401,N813
