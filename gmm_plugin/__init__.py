"""gmm-plugin: MindSpeed-compatible grouped matmul (npu_gmm / npu_gmm_v2) on NPU, GPU and CPU."""
from . import settings  # the runtime settings; also `with gmm_plugin.settings(...):` for a block
from .config import GmmPluginConfig, load_config
from .ops.gmm import npu_gmm, npu_gmm_v2
from .settings import Settings, configure, set_backend, set_fused_wgrad_dtype

__version__ = "0.1.0"
__all__ = ["npu_gmm", "npu_gmm_v2", "settings", "Settings", "configure", "set_backend",
           "set_fused_wgrad_dtype", "load_config", "GmmPluginConfig", "__version__"]
