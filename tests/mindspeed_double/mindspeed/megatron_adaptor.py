"""`import mindspeed.megatron_adaptor` patches everything at import (`megatron_adaptor.py:66` calls
patch_features(), :24-42), from the arguments on sys.argv at that moment (args_utils)."""
from mindspeed.args_utils import get_mindspeed_args
from mindspeed.features import register_patches
from mindspeed.patch_utils import MindSpeedPatchesManager

register_patches(get_mindspeed_args())
MindSpeedPatchesManager.apply_patches()
