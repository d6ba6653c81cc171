"""A stand-in `torch_npu` with only what `import mindspeed.megatron_adaptor` (MindSpeed
26.0.0_core_r0.12.1 and core_r0.18.0) touches on a CPU; no op is computed here.

- `torch.npu` is this package's `npu` module, as torch_npu sets it (MindSpeed reads
  `torch.npu.*`, e.g. `mindspeed/core/tensor_parallel/random.py`).
- `contrib.transfer_to_npu` (`mindspeed/megatron_adaptor.py:11`): imported for its side effects.
- `npu._lazy_call`, `npu.device` (`mindspeed/core/tensor_parallel/random.py`:
  `from torch_npu.npu import _lazy_call, device as device_ctx_manager`), `npu.Stream`.
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
torch.npu = npu
sys.modules.setdefault("torch.npu", npu)
