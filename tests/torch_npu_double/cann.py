"""A stand-in CANN install tree for the one question the npu backend asks CANN directly: which aclnn
kernels its op libraries export (op-plugin's check_aclnn_kernel_available; the backend's
npu.cann_exports). It is a real shared library, `$ASCEND_HOME_PATH/lib64/libopapi_gmm_double.so`,
built with the C compiler, exporting `<kernel>` and `<kernel>GetWorkspaceSize` stubs (never called)
for each kernel the simulated CANN has, so the backend's ctypes lookup runs as it would on a machine
with CANN. None when no C compiler is available (tests that need it skip).
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile

_trees: dict[frozenset[str], str | None] = {}


def ascend_home(kernels: frozenset[str]) -> str | None:
    """An ASCEND_HOME_PATH whose lib64 exports exactly `kernels`; built once per set of kernels."""
    if kernels in _trees:
        return _trees[kernels]
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    home = None
    if cc:
        root = tempfile.mkdtemp(prefix="gmm_double_cann_")
        atexit.register(shutil.rmtree, root, True)
        lib64 = os.path.join(root, "lib64")
        os.makedirs(lib64)
        source = os.path.join(root, "stubs.c")
        with open(source, "w") as f:
            for k in sorted(kernels):
                f.write(f"int {k}GetWorkspaceSize(void) {{ return 561000; }}\nint {k}(void) {{ return 561000; }}\n")
            f.write("int gmm_double_cann_stub(void) { return 0; }\n")
        result = subprocess.run([cc, "-shared", "-fPIC", "-o", os.path.join(lib64, "libopapi_gmm_double.so"), source],
                                capture_output=True, text=True, timeout=120)
        home = root if result.returncode == 0 else None
    _trees[kernels] = home
    return home
