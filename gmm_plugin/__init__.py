"""gmm-plugin: MindSpeed-compatible grouped matmul (npu_gmm / npu_gmm_v2) on NPU, GPU and CPU."""
from .backends import set_backend
from .backends.torch_backend import set_fused_wgrad_dtype
from .config import GmmPluginConfig, load_config
from .ops.gmm import npu_gmm, npu_gmm_v2

__version__ = "0.1.0"
__all__ = ["npu_gmm", "npu_gmm_v2", "set_backend", "set_fused_wgrad_dtype", "load_config", "GmmPluginConfig", "__version__"]
