"""A stand-in `torch_npu` with only what `import mindspeed.megatron_adaptor` (MindSpeed
26.0.0_core_r0.12.1 and core_r0.18.0) touches on a CPU; no op is computed here.

- `torch.npu` is this package's `npu` module, as torch_npu sets it (MindSpeed reads
  `torch.npu.*`, e.g. `mindspeed/core/tensor_parallel/random.py`).
- `contrib.transfer_to_npu` (`mindspeed/megatron_adaptor.py:11`): imported for its side effects.
- `npu._lazy_call`, `npu.device` (`mindspeed/core/tensor_parallel/random.py`:
  `from torch_npu.npu import _lazy_call, device as device_ctx_manager`), `npu.Stream`.
- `unsupported_dtype` (`mindspeed/core/multi_modal/dist_train/dist_communication.py:23`).
- `utils.collect_env.get_cann_version` (`mindspeed/utils.py`, `mindspeed/te/...`).
- `_C._distributed_c10d.ProcessGroupHCCL.Options`, reached from `initialize_model_parallel`
  through MindSpeed's `profiler/profiler_info.py` wrapper; that wrapper uses `hccl_config` only
  when the class has it, so the stand-in must not have it.
"""
import sys
import types

import torch

from . import npu  # noqa: E402
from . import _C, contrib, utils  # noqa: F401,E402

__version__ = "2.7.1.stand_in"
# `mindspeed/core/multi_modal/dist_train/dist_communication.py:23` reads it at import (the
# quantised dtypes torch_npu cannot hold).
unsupported_dtype = [torch.quint8, torch.quint4x2, torch.quint2x4, torch.qint32, torch.qint8]


def npu_swiglu(x, dim=-1):
    """The one op computed here: MindSpeed's GLU experts call it (`mindspeed/core/fusions/
    fused_bias_swiglu.py:5`, fused_swiglu). torch_npu's documented result: x split in two halves
    along dim, silu(first) * second. Autograd through torch's own ops."""
    a, b = torch.chunk(x, 2, dim=dim)
    return torch.nn.functional.silu(a) * b
torch.npu = npu
sys.modules.setdefault("torch.npu", npu)
