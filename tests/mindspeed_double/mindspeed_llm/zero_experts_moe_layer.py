"""`zero_experts_moe_layer.py:21-22` of MindSpeed-LLM 26.0.0: a functools.wraps wrapper of
MoELayer.__init__ (zero experts are off unless configured: it calls the original)."""
import functools

WRAPPED_CALLS = []


def zero_experts_moe_layer_init_wrapper(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        WRAPPED_CALLS.append(type(self).__name__)
        fn(self, *args, **kwargs)
    return wrapper
