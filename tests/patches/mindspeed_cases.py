"""The MindSpeed-beside-gmm-plugin cases, run by test_mindspeed.py (the double) and
test_mindspeed_real.py (a real MindSpeed source tree): one subprocess per import order
(mindspeed_worker.py), checked against what must hold whatever the order.

Each case: (id, ORDER, MODE, ENTRY, worker flags, MindSpeed argv, what must hold). `legacy` cases
need megatron-core < 0.17 (GroupedMLP + grouped_gemm_util), `modern` ones 0.17+.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GROUPED = ["--moe-grouped-gemm", "--gemm-gradient-accumulation-fusion"]
MS_EXPERTS = "mindspeed.core.transformer.moe.moe_feature.adaptor.MindSpeedGmmExperts"
PLUGIN_GMM = "gmm-plugin npu_gmm_v2"

# id, order, mode, entry, flags, MindSpeed argv, expected {experts, gmm_by_plugin, built}
LEGACY = [
    ("ms_first-defer-apply", "ms_first", "defer", "apply", [], GROUPED, "left to MindSpeed"),
    ("ms_first-defer-adaptor", "ms_first", "defer", "adaptor", [], GROUPED, "left to MindSpeed"),
    ("ms_first-gmm-apply", "ms_first", "gmm", "apply", [], GROUPED, "MindSpeed's experts on gmm-plugin's GMM"),
    ("plugin_first-defer-adaptor", "plugin_first", "defer", "adaptor", [], GROUPED, "left to MindSpeed"),
    ("plugin_first-gmm-adaptor", "plugin_first", "gmm", "adaptor", [], GROUPED,
     "MindSpeed's experts on gmm-plugin's GMM"),
    ("plugin_first-gmm-apply", "plugin_first", "gmm", "apply", [], GROUPED, "MindSpeed's experts on gmm-plugin's GMM"),
    ("ggops_only-ms_first-defer", "ms_first", "defer", "apply", [], [], "legacy GroupedMLP"),
    ("ggops_only-plugin_first-defer", "plugin_first", "defer", "adaptor", [], [], "legacy GroupedMLP"),
    ("llm-plugin_first-defer", "plugin_first", "defer", "adaptor", ["--llm"], GROUPED, "left to MindSpeed"),
]
MODERN = [
    ("r018-ms_first-grouped_experts", "ms_first", "defer", "apply", ["--grouped-experts"], [], "GmmGroupedMLP"),
    ("r018-plugin_first-gmm-grouped_experts", "plugin_first", "gmm", "adaptor", ["--grouped-experts"], [],
     "GmmGroupedMLP"),
    ("r018-rejects-moe-grouped-gemm", "plugin_first", "defer", "adaptor", [], ["--moe-grouped-gemm"], "GmmGroupedMLP"),
    ("r017-plugin_first-defer", "plugin_first", "defer", "adaptor", ["branch=core_r0.17.0"], GROUPED,
     "GmmGroupedMLP"),
    ("llm-ms_first-grouped_experts", "ms_first", "defer", "apply", ["--llm", "--grouped-experts"], [],
     "GmmGroupedMLP"),
]


def run_case(case, pythonpath: list[str], env_extra=None, no_ms_gmm=False, timeout=420) -> dict:
    _, order, mode, entry, flags, ms_argv, _ = case
    env = dict(os.environ)
    env.pop("GMM_PLUGIN_MINDSPEED", None)
    worker_flags = [f for f in flags if not f.startswith("branch=")]
    for f in flags:
        if f.startswith("branch="):
            env["MINDSPEED_DOUBLE_BRANCH"] = f.split("=", 1)[1]
    if no_ms_gmm:
        worker_flags.append("--no-ms-gmm")
    paths = pythonpath + [ROOT] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(env_extra or {})
    cmd = [sys.executable, os.path.join(HERE, "mindspeed_worker.py"), order, mode, entry, *worker_flags, "--", *ms_argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["printed"] = [ln for ln in proc.stdout.splitlines() if ln.startswith("gmm-plugin patches:")]
    return result


def check(case, r: dict, *, ms_gmm_ran: bool = True) -> None:
    """What must hold for the case, whatever the order."""
    cid, order, mode, entry, flags, ms_argv, experts = case
    rep = r["report"]
    assert rep["experts"] == experts, rep["text"]
    assert rep["experts"] in rep["text"] and rep["gmm"] in rep["text"]
    # MindSpeed saw every flag the user gave it, in either order (the adaptor keeps it).
    fusion_flag = "--gemm-gradient-accumulation-fusion" in ms_argv
    assert r["mindspeed_saw_fusion_flag"] is fusion_flag
    if entry == "adaptor" and fusion_flag:
        assert "--gemm-gradient-accumulation-fusion" in r["argv_after_plugin"]
    assert not any(a.startswith("--gmm-plugin") or a == "--use-gmm-plugin" for a in r.get("argv_after_plugin", []))
    if entry == "adaptor":  # the adaptor's printed line, printed again when MindSpeed changed what runs
        assert r["printed"] and f"experts: {experts};" in r["printed"][-1], r["printed"]
    if "--llm" in flags:
        assert "wrapped by mindspeed_llm" in (rep["mindspeed"] or ""), rep["text"]
    legacy = "gg_ops" in r
    if experts == "left to MindSpeed":
        assert r["built"] == MS_EXPERTS
        assert PLUGIN_GMM not in rep["gmm"] and "MindSpeed" in rep["gmm"]
        if ms_gmm_ran:
            calls = r["mindspeed_ops_calls"]
            assert len(calls) == 2 and all(c["gemm_fusion"] is fusion_flag and c["original_weight"] for c in calls)
            assert r["compare"]["plugin_calls"] == []
    elif experts.startswith("MindSpeed's experts"):
        assert r["built"] == MS_EXPERTS and rep["gmm"].startswith(PLUGIN_GMM)
        assert "overlap experts" in " ".join(rep["notes"]) and "quantised GMM" in " ".join(rep["notes"])
        assert "legacy_gmm" in r["gg_ops"]
    else:
        assert r["built"].startswith("megatron.core.") or r["built"].startswith("patches."), r["built"]
        assert rep["gmm"].startswith(PLUGIN_GMM)
        if legacy:
            assert "legacy_gmm" in r["gg_ops"] and "replaced no experts" in " ".join(rep["notes"])
    if "compare" in r:
        c = r["compare"]
        for key in ("out", "dx", "dw1", "dw2"):
            assert c[key] < 1e-5, (key, c)  # fp32, one reassociation of the same products
        if PLUGIN_GMM in rep["gmm"]:
            # the dispatcher's counts, as they are: no cumsum, no copy to another device
            assert [call["group_list"] for call in c["plugin_calls"]] == [[3, 0, 5, 2]] * 2, c
            if experts.startswith("MindSpeed's experts"):
                assert all(call["gemm_fusion"] is fusion_flag for call in c["plugin_calls"])
                assert c["fused_into_main_grad"] is fusion_flag
    # revert(): only where the plugin's object is still there; never None under MindSpeed's experts
    after = r["after_revert"]
    assert after["applied"] is False
    if legacy:
        assert "mindspeed.core.fusions.grouped_matmul.Ops" in after["gg_ops"], after
        if r["built"] == MS_EXPERTS:
            assert after["GroupedMLP"] == MS_EXPERTS
            if ms_gmm_ran:
                assert after["mindspeed_experts_run"] == [6, 16]


def table_row(case, r: dict) -> str:
    """One docs/patches.md row: what ran, in that order and mode."""
    rep, c = r["report"], r.get("compare")
    errs = "not run (MindSpeed's own GMM)" if c is None else \
        f"out {c['out']:.1e}, dx {c['dx']:.1e}, dW {max(c['dw1'], c['dw2']):.1e}" + \
        (" (main_grad)" if c["fused_into_main_grad"] else "")
    after = r["after_revert"].get("gg_ops", "-")
    after = "MindSpeed's Ops" if "mindspeed" in after else after
    return (f"| {case[0]} | {r['built'].rsplit('.', 1)[-1]} | {rep['experts']} | {rep['gmm'].split(' (')[0]} | "
            f"{'yes' if r['mindspeed_saw_fusion_flag'] else 'no'} | {errs} | {after} |")


if __name__ == "__main__":  # python mindspeed_cases.py legacy|modern PATH... [--real]: a results table
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=("legacy", "modern"))
    p.add_argument("path", nargs="+")
    p.add_argument("--real", action="store_true")
    p.add_argument("--only", default="")
    a = p.parse_args()
    print("| case | experts built | report: experts | report: GMM | MindSpeed saw the fusion flag | "
          "vs SequentialMLP (rel. err.) | gg.ops after revert() |")
    print("|---|---|---|---|---|---|---|")
    for case in (LEGACY if a.which == "legacy" else MODERN):
        if a.only and not case[0].startswith(tuple(a.only.split(","))):
            continue
        if a.real:
            case = case[:4] + ([f for f in case[4] if not f.startswith("branch=")] + ["--megatron-args"],) + case[5:]
        r = run_case(case, a.path, no_ms_gmm=a.real)
        check(case, r, ms_gmm_ran=not a.real)
        print(table_row(case, r), flush=True)
