"""One import order of MindSpeed (the double in tests/mindspeed_double, or a real source tree) and
gmm-plugin, in its own process (MindSpeed patches Megatron at import). Prints `RESULT <json>`.

    python mindspeed_worker.py ORDER MODE ENTRY [--llm] [--no-ms-gmm] -- MINDSPEED_ARGV...

ORDER ms_first | plugin_first; MODE defer | gmm (the plugin's `mindspeed` key); ENTRY apply
(`patches.apply({...})`) | adaptor (`import patches.megatron_adaptor` with the plugin's flags on
sys.argv, as examples/megatron_lm_launch.py does). --llm imports mindspeed_llm instead of
mindspeed.megatron_adaptor. --no-ms-gmm: do not run MindSpeed's own GMM (the real one needs an NPU).
MINDSPEED_ARGV is the training command line MindSpeed reads (e.g. --moe-grouped-gemm
--gemm-gradient-accumulation-fusion). The experts are built from Megatron's names as a spec would
(legacy: experts.GroupedMLP; 0.17+: a MoELayer from Megatron's local spec) and compared with
SequentialMLP built from the same weights: output, dx, dW (or main_grad with fusion).
"""
from __future__ import annotations

import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    sep = sys.argv.index("--")
    order, mode, entry, *flags = sys.argv[1:sep]
    ms_argv = sys.argv[sep + 1:]
    llm, run_ms_gmm = "--llm" in flags, "--no-ms-gmm" not in flags  # --megatron-args: see below
    grouped_experts = "--grouped-experts" in flags
    os.environ.setdefault("GMM_PLUGIN_BACKEND", "torch")
    plugin_argv = ["--use-gmm-plugin", "--gmm-plugin-mindspeed", mode] + \
        (["--gmm-plugin-grouped-experts"] if grouped_experts else [])
    sys.argv = [sys.argv[0]] + ms_argv + (plugin_argv if entry == "adaptor" else [])
    sys.path.insert(0, HERE)
    import torch
    late = os.environ.get("MINDSPEED_LATE_PATH")
    if late:
        # The triton stand-in (core_r0.18.0 runs) must not be seen by torch's inductor, which probes
        # triton when it is first imported: import it first (it then finds no triton), then add it.
        import torch._dynamo  # noqa: F401
        import torch._inductor.runtime.triton_compat  # noqa: F401
        sys.path.insert(0, late)
    from patches import cpu_platform
    cpu_platform.ensure_typing_override()  # Megatron-LM 0.18+'s training code on Python 3.11
    if "--megatron-first" in flags:
        import megatron.core  # noqa: F401  (before MindSpeed's dummy transformer_engine: core_r0.18.0)

    import patches
    from gmm_plugin.ops import gmm as gmm_ops

    out: dict = {"argv_at_start": sys.argv[1:]}
    plugin_calls = []
    real_v2 = gmm_ops.npu_gmm_v2

    def counting_v2(x, weight, *, group_list=None, **kw):
        plugin_calls.append({"group_list": group_list.tolist(), "device": str(group_list.device),
                             "gemm_fusion": bool(kw.get("gemm_fusion"))})
        return real_v2(x, weight, group_list=group_list, **kw)
    gmm_ops.npu_gmm_v2 = counting_v2

    def import_mindspeed():
        if llm:
            import mindspeed_llm  # noqa: F401
        else:
            import mindspeed.megatron_adaptor  # noqa: F401
        from mindspeed.args_utils import get_mindspeed_args
        out["mindspeed_saw_fusion_flag"] = bool(getattr(get_mindspeed_args(), "gemm_gradient_accumulation_fusion", False))

    def enable_plugin():
        if entry == "apply":
            patches.apply({"mindspeed": mode, "backend": "torch", "cpu_shim": "on",
                           "grouped_experts": grouped_experts})
        else:
            importlib.import_module("patches.megatron_adaptor")
        out["argv_after_plugin"] = sys.argv[1:]

    for step in ((import_mindspeed, enable_plugin) if order == "ms_first" else (enable_plugin, import_mindspeed)):
        step()
    current = getattr(patches, "report", lambda: patches._report)  # (tolerant of older patches, for
    report = current()                                              #  checking a test fails on old code)
    out["report_before_build"] = {"experts": report.experts, "gmm": getattr(report, "gmm", "")}

    if "--megatron-args" in flags:
        # Real MindSpeed reads Megatron's parsed arguments in its experts' forward (get_full_args():
        # fp8, recompute flags): parse them as pretrain would (its own parser, MindSpeed's extras).
        from megatron.training.arguments import parse_args
        from megatron.training.global_vars import set_args
        set_args(parse_args(ignore_unknown_args=True))
    import mcore_helpers as h
    from megatron.core.transformer.moe import experts as mexperts
    h.ensure_world()
    legacy = patches.version_rules().legacy_grouped_mlp
    num, hidden = 4, 16
    config = h.make_config(experts=num, moe_grouped_gemm=not grouped_experts)
    out["config_gemm_gradient_accumulation_fusion"] = bool(getattr(config, "gemm_gradient_accumulation_fusion", False))
    if legacy:
        grouped = mexperts.GroupedMLP(num, config, **h._pg_kwargs(mexperts.SequentialMLP))  # the name a spec builds (MindSpeed's class if replaced)
    else:
        grouped = h.moe_layer(config, grouped=not grouped_experts).experts
    out["built"] = f"{type(grouped).__module__}.{type(grouped).__qualname__}"
    report = current()
    out["report"] = {"experts": report.experts, "gmm": getattr(report, "gmm", ""), "mindspeed": report.mindspeed,
                     "notes": getattr(report, "notes", []), "text": str(report)}
    if legacy:
        from megatron.core.transformer.moe import grouped_gemm_util as gg
        out["gg_ops"] = repr(gg.ops)

    ms_gmm_runs = "mindspeed" in out["built"] and "gmm-plugin" not in out["report"]["gmm"]
    if run_ms_gmm or not ms_gmm_runs:
        out["compare"] = compare(h, grouped, num, hidden, config, plugin_calls)
    try:
        from mindspeed.core.fusions import grouped_matmul
        out["mindspeed_ops_calls"] = list(getattr(grouped_matmul, "CALLS", []))
    except ImportError:
        pass

    try:  # MindSpeed's own check of the parsed arguments (the double's; core_r0.18.0 rejects --moe-grouped-gemm)
        import argparse

        from mindspeed.features import validate_features_args
        validate_features_args(argparse.Namespace(
            moe_grouped_gemm=config.moe_grouped_gemm,
            gemm_gradient_accumulation_fusion=out["config_gemm_gradient_accumulation_fusion"]))
        out["mindspeed_validate"] = "ok"
    except ImportError:
        pass
    except (AssertionError, NotImplementedError) as e:
        out["mindspeed_validate"] = f"{type(e).__name__}: {e}"
    patches.revert()
    out["after_revert"] = {"applied": patches.is_applied()}
    if legacy:
        out["after_revert"]["gg_ops"] = repr(gg.ops)
        out["after_revert"]["GroupedMLP"] = f"{mexperts.GroupedMLP.__module__}.{mexperts.GroupedMLP.__qualname__}"
        if run_ms_gmm and "mindspeed" in out["built"]:
            x = torch.randn(6, hidden)
            y, _ = grouped(x, torch.tensor([1, 2, 3, 0]), torch.rand(6))
            out["after_revert"]["mindspeed_experts_run"] = list(y.shape)
    print("RESULT " + json.dumps(out), flush=True)


def compare(h, grouped, num, hidden, config, plugin_calls):
    """grouped against SequentialMLP from the same weights; with MindSpeed's fusion flag on,
    dW is read from main_grad (Megatron DDP's buffers, zeroed) and .grad must stay None."""
    import torch
    torch.manual_seed(0)
    seq = h.build_sequential(num, config)
    h.copy_sequential_to_grouped(seq, grouped)
    fusion = bool(getattr(config, "gemm_gradient_accumulation_fusion", False))
    if fusion:
        for w in (grouped.weight1, grouped.weight2):
            w.main_grad = torch.zeros_like(w, dtype=torch.float32)
            w.grad_added_to_main_grad = False
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, hidden)
    probs, dy = torch.rand(10), torch.randn(10, hidden)
    results = {}
    for name, module in (("grouped", grouped), ("sequential", seq)):
        xi = x.clone().requires_grad_()
        del plugin_calls[:]
        y, _ = module(xi, counts, probs)
        (y * dy).sum().backward()
        results[name] = (y.detach(), xi.grad)
        if name == "grouped":
            calls = list(plugin_calls)
    g1, g2 = h.sequential_grads_as_grouped(seq, num, hidden)
    fused = bool(getattr(grouped.weight1, "grad_added_to_main_grad", False))
    if fused:  # dW went into main_grad (MindSpeed's protocol flag set); .grad holds a dummy if anything
        d1 = grouped.weight1.main_grad.view(num, hidden, -1)
        d2 = grouped.weight2.main_grad.view(num, -1, hidden)
    else:
        d1 = grouped.weight1.grad.view(num, hidden, -1)
        d2 = grouped.weight2.grad.view(num, -1, hidden)
    return {"fusion_flag": fusion, "fused_into_main_grad": fused,
            "out": h.rel_err(results["grouped"][0], results["sequential"][0]),
            "dx": h.rel_err(results["grouped"][1], results["sequential"][1]),
            "dw1": h.rel_err(d1, g1), "dw2": h.rel_err(d2, g2),
            "plugin_calls": calls}


if __name__ == "__main__":
    main()
