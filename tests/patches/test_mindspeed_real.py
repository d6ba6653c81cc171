"""The MindSpeed cases of mindspeed_cases.py against a REAL MindSpeed source tree; skipped unless
MINDSPEED_SRC (a folder holding `mindspeed/`, e.g. `git archive 26.0.0_core_r0.12.1 mindspeed`) and
MEGATRON_LM (a Megatron-LM source tree of the matching core version) are set. MINDSPEED_LLM_SRC
(a folder holding `mindspeed_llm/`) adds the MindSpeed-LLM case. Stand-ins for torch_npu, torchair,
scipy (and triton + a top-level megatron_adaptor for core_r0.17.0 / core_r0.18.0) come from
tests/mindspeed_double/stand_ins. MindSpeed's own GMM is not run (it JIT-builds for an NPU): the
defer cases check what is installed and reported; the gmm cases run MindSpeed's real
MindSpeedGmmExperts on the plugin's GMM against SequentialMLP. Recorded in docs/patches.md."""
from __future__ import annotations

import os
import re

import pytest

import mindspeed_cases as mc

SRC, MLM = os.environ.get("MINDSPEED_SRC"), os.environ.get("MEGATRON_LM")
LLM = os.environ.get("MINDSPEED_LLM_SRC")
pytestmark = [pytest.mark.megatron,
              pytest.mark.skipif(not (SRC and MLM), reason="set MINDSPEED_SRC and MEGATRON_LM to run against "
                                                           "a real MindSpeed source tree")]
STAND_INS = os.path.join(mc.ROOT, "tests", "mindspeed_double", "stand_ins")


def _megatron_minor():
    text = open(os.path.join(MLM, "megatron", "core", "package_info.py")).read()
    return int(re.search(r"^MINOR\s*=\s*(\d+)", text, re.M).group(1))


def _mindspeed_branch():
    gmm = open(os.path.join(SRC, "mindspeed", "features_manager", "moe", "gmm.py")).read()
    return "core_r0.18.0" if "not adapted to Megatron 0.18" in gmm else "other"


def _cases():
    if not (SRC and MLM):
        return mc.LEGACY + mc.MODERN
    if _megatron_minor() < 17:
        return [c for c in mc.LEGACY if "--llm" not in c[4] or LLM]
    prefix = "r018" if _mindspeed_branch() == "core_r0.18.0" else "r017"
    return [c for c in mc.MODERN if c[0].startswith(prefix) or ("--llm" in c[4] and LLM)]


@pytest.mark.parametrize("case", _cases(), ids=[c[0] for c in _cases()])
def test_mindspeed_real_source(case):
    path, env, extra = [MLM, STAND_INS, SRC] + ([LLM] if LLM else []), {}, ["--megatron-args"]
    if _megatron_minor() >= 17:
        if not os.environ.get("MINDSPEED_REAL_TRY_R018"):
            pytest.skip("MindSpeed core_r0.17.0 / core_r0.18.0 with Megatron-LM 0.17+ does not import on a CPU "
                        "here: it patches megatron.core.extensions.transformer_engine, which needs Transformer "
                        "Engine (docs/patches.md#mindspeed); MINDSPEED_REAL_TRY_R018=1 tries anyway")
        # the top-level megatron_adaptor and triton stand-ins, on sys.path after torch's inductor probed
        env["MINDSPEED_LATE_PATH"] = os.path.join(STAND_INS, "r018")
        extra.append("--megatron-first")
    case = case[:4] + ([f for f in case[4] if not f.startswith("branch=")] + extra,) + case[5:]
    r = mc.run_case(case, path, env_extra=env, no_ms_gmm=True)
    mc.check(case, r, ms_gmm_ran=False)
