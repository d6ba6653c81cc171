"""The MindSpeed features that touch Megatron's MoE experts (features_manager/ in the real tree).

- GroupedMatmulFeature, optimization level 0, so ALWAYS applied
  (`features_manager/fusions/grouped_matmul.py:6-16`, 26.0.0_core_r0.12.1; `feature.py:17-20`
  is_need_apply): grouped_gemm_util.ops = Ops, grouped_gemm_is_available,
  assert_grouped_gemm_is_available, torch.cuda.get_device_capability -> (9, 0). Absent from
  core_r0.17.0 / core_r0.18.0 (Megatron 0.17 removed grouped_gemm_util).
- MoEGmmFeature (`features_manager/moe/gmm.py`): registers --gemm-gradient-accumulation-fusion
  (:11-14); validate_args: the flag needs --moe-grouped-gemm (:16-19), and core_r0.18.0 rejects
  --moe-grouped-gemm with NotImplementedError (core_r0.18.0 gmm.py:17-20); with --moe-grouped-gemm,
  experts.GroupedMLP = MindSpeedGmmExperts (:24-27; core_r0.17.0 gmm.py:25-26 registers the same
  name, which Megatron 0.17 no longer reads).
- MegatronBasicFeature: TransformerConfig.__init__ gets `transformer_config_init_wrapper`
  (`features_manager/megatron_basic/megatron_basic.py:46-49`,
  `core/megatron_basic/arguments_basic.py:88-112`, a functools.wraps wrapper): every MindSpeed
  argument the config does not know becomes a config attribute, which is how
  `config.gemm_gradient_accumulation_fusion` exists. (The real one also re-makes the dataclass
  and passes known args as keyword defaults; the attribute is what the experts read.)
"""
import functools
import inspect

import torch

from mindspeed import branch
from mindspeed.patch_utils import MindSpeedPatchesManager as pm


def register_features_args(parser):
    parser.add_argument("--gemm-gradient-accumulation-fusion", action="store_true",
                        help="Use gradient-accumulation-fusion in gemm.")
    parser.add_argument("--optimization-level", type=int, default=2)


def validate_features_args(args):
    """What the real validate_args_wrapper runs after Megatron's validation
    (core/megatron_basic/arguments_basic.py:37-56 of core_r0.18.0)."""
    if branch() == "core_r0.18.0" and getattr(args, "moe_grouped_gemm", False):
        raise NotImplementedError("MindSpeed --moe-grouped-gemm is not adapted to Megatron 0.18 in this "
                                  "scoped adaptation.")
    if getattr(args, "gemm_gradient_accumulation_fusion", False) and not getattr(args, "moe_grouped_gemm", False):
        raise AssertionError("`--gemm-gradient-accumulation-fusion` only support with `--moe-grouped-gemm`.")


def transformer_config_init_wrapper(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        from mindspeed.args_utils import get_mindspeed_args
        known = inspect.signature(type(self)).parameters
        for key, value in vars(get_mindspeed_args()).items():
            if key not in known and not hasattr(self, key):
                object.__setattr__(self, key, value)
        fn(self, *args, **kwargs)
    return wrapper


def get_device_capability(device=None):
    return 9, 0


def register_patches(args):
    legacy = branch() == "26.0.0_core_r0.12.1"
    pm.register_patch("megatron.core.transformer.transformer_config.TransformerConfig.__init__",
                      transformer_config_init_wrapper)
    if legacy:
        from mindspeed.core.fusions import grouped_matmul as gm
        gg = "megatron.core.transformer.moe.grouped_gemm_util."
        pm.register_patch(gg + "ops", gm.Ops)
        pm.register_patch(gg + "grouped_gemm_is_available", gm.grouped_gemm_is_available)
        pm.register_patch(gg + "assert_grouped_gemm_is_available", gm.assert_grouped_gemm_is_available)
        pm.register_patch("torch.cuda.get_device_capability", get_device_capability)
    if getattr(args, "moe_grouped_gemm", False) and branch() != "core_r0.18.0":
        from mindspeed.core.transformer.moe.moe_feature.adaptor import MindSpeedGmmExperts
        pm.register_patch("megatron.core.transformer.moe.experts.GroupedMLP", MindSpeedGmmExperts)
