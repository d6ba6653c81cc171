"""Mirrors mindspeed.ops: `from gmm_plugin.ops import gmm; gmm.npu_gmm(...)`."""
from . import gmm

__all__ = ["gmm"]
