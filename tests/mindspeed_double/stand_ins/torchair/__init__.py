"""A stand-in torchair: `mindspeed/op_builder/gmm_builder.py:4-15` imports torchair and, in a
try block, `torchair.ge` (Tensor, TensorSpec, DataType) and `register_fx_node_ge_converter`,
used only to register graph-mode converters (never run on a CPU)."""
from . import ge  # noqa: F401


def register_fx_node_ge_converter(target):
    def decorator(fn):
        return fn
    return decorator
