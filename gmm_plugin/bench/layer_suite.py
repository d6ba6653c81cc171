"""The layer suite: a Megatron-core MoE layer forward+backward with the plugin's experts against
SequentialMLP built from the same weights (and the legacy GroupedMLP where megatron-core has it).

Gradients, per block of rows:
* `.grad`: plain autograd, no DDP; the plugin has no main_grad to fuse into.
* `DDP fp32 main_grad`: each layer inside Megatron's own DistributedDataParallel (fp32 grad
  buffers); the plugin's default config fuses the expert weight gradients into main_grad,
  SequentialMLP's go through DDP's hook. Each timed call is one micro-batch (zero_grad_buffer and
  the gradient all-reduce come once per iteration and cost every experts class the same).
The plugin runs with the default config (`gmm-plugin`) and, where the fused weight gradient's
dtype changes the GEMM (bf16 under DDP), with fused_wgrad_dtype fp32 and input set explicitly.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .. import settings
from .cases import DTYPES, wgrad_dtype_matters
from .measure import Row, measure, release_freed_memory, rows_from

DENSE = "expert GEMMs as dense torch.mm"
SEQUENTIAL = "SequentialMLP"
PLUGIN = "gmm-plugin"
PLUGIN_AS = {dt: f"gmm-plugin (fused_wgrad_dtype {dt})" for dt in ("fp32", "input")}
LEGACY = "legacy GroupedMLP (loop gmm)"
GRADS = {"plain": ".grad", "main_grad": "DDP fp32 main_grad"}
CPU = torch.device("cpu")
# Untimed rounds per block, at least: a block's fresh layers grow glibc's heap over their first
# rounds, and every new heap page costs a page fault on first touch (~11 us per 4 KiB page on the
# reference VM, a few hundred ms per round): the figure is a training run's steady state.
LAYER_WARMUP = 3


def layer_suite(args) -> tuple[list[Row], str | None]:
    """Rows, or no rows and why the suite cannot run here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            import megatron.core  # noqa: F401

        import patches
        from patches import cpu_platform
    except ImportError as e:
        return [], f"needs megatron-core and the patches package ({e})"
    from ..config import load_config
    from . import megatron_layer
    cfg = load_config(None, env={})  # the default config, whatever the environment says
    shim_was_on = cpu_platform.is_enabled()
    cpu_platform.enable(force=True)  # the layer runs on the CPU, even where CUDA exists
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Megatron: TE/Apex missing, deprecations
            megatron_layer.ensure_world()
            patches.apply(cfg)
            return _rows(args, cfg, megatron_layer), None
    finally:
        patches.revert()
        if not shim_was_on:  # torch.cuda back to itself for whatever runs next
            cpu_platform.disable()


def _rows(args, cfg, ml) -> list[Row]:
    rows = []
    for dname in [d for d in args.dtypes if d != "fp16"]:
        dtype = DTYPES[dname]
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.layer_tokens, 1, args.hidden, generator=g).to(dtype)
        dy = (torch.randn(args.layer_tokens, 1, args.hidden, generator=g) * 1e-2).to(dtype)
        for E in args.experts:
            for grads in args.layer_grads:
                rows += _block(args, cfg, ml, E, dname, grads, x, dy)
                release_freed_memory()  # the next block starts from what is alive
    return rows


def _block(args, cfg, ml, E, dname, grads, x, dy) -> list[Row]:
    """One block's rows. Its layers live in this call's locals only, so they are gone when it
    returns (a loop variable of the caller kept the last one alive into the next block)."""
    T, H, F = args.layer_tokens, args.hidden, args.ffn
    routed = T * args.topk
    flops = 3 * 2.0 * routed * H * (2 * F + F)  # fc1 (GLU: 2F wide) + fc2, forward and 2 backward
    cases, models, notes, extra = _cases(args, cfg, ml, E, DTYPES[dname], grads, x, dy)
    cases = {DENSE: _dense_gemms(routed, H, F, DTYPES[dname]), **cases}
    samples, peaks = measure(cases, args, CPU, min_warmup=LAYER_WARMUP)
    for model in models:  # or each DDP block's layers stay alive to the end of the run
        ml.release(model)
    meta = dict(suite="layer", op=f"MoE layer fwd+bwd T={T} top{args.topk} ({GRADS[grads]})",
                dtype=dname, experts=E)
    return rows_from(samples, flops, DENSE, meta, peaks, notes=notes, extra=extra)


def _cases(args, cfg, ml, E, dtype, grads, x, dy):
    """{name: step}, the models, notes and extra figures for one block: the layers are built
    here, fresh."""
    torch.manual_seed(args.seed)
    seq = ml.moe_layer(args, E, dtype, grouped=False)
    plug = ml.moe_layer(args, E, dtype, grouped=True)
    ml.copy_weights(seq, plug)
    layers = {SEQUENTIAL: (seq, contextlib.nullcontext), PLUGIN: (plug, contextlib.nullcontext)}
    if ml.has_legacy_grouped_mlp() and dtype == torch.bfloat16:  # GroupedMLP asserts bf16 there
        with ml.unpatched_legacy(cfg):
            legacy = ml.moe_layer(args, E, dtype, grouped=True)
        ml.copy_weights(seq, legacy)
        layers[LEGACY] = (legacy, lambda: ml.unpatched_legacy(cfg))
    ddp = grads == "main_grad"
    models = {name: (ml.with_ddp(layer) if ddp else layer, enter) for name, (layer, enter) in layers.items()}
    cases = {name: _step(model, x, dy, enter) for name, (model, enter) in models.items()}
    if ddp and wgrad_dtype_matters(dtype, CPU):
        for dt, name in PLUGIN_AS.items():
            cases[name] = _step(models[PLUGIN][0], x, dy, lambda dt=dt: settings(fused_wgrad_dtype=dt))
    fused = ddp and cfg.gemm_fusion
    wmb = ml.expert_weight_mb(plug)
    note = f"experts: {type(plug.experts).__name__}" + (", gemm_fusion into main_grad" if fused else "")
    return cases, [model for model, _ in models.values()], {PLUGIN: note}, \
        {"expert_weights_mb": round(wmb, 2), "grads": GRADS[grads]}


def _step(model, x, dy, enter):
    """One forward+backward of model (a layer, or DDP around it) inside enter()."""
    def run():
        with enter():
            out, _ = model(x.detach().requires_grad_(True))
            out.backward(dy)
        model.zero_grad(set_to_none=True)  # .grad rows; under DDP its hook has dropped .grad already
    return run


def _dense_gemms(routed, H, F, dtype):
    """The layer's expert GEMMs as plain torch.mm at the same shapes: its FLOPs at dense speed."""
    a1, w1 = torch.randn(routed, H).to(dtype), torch.randn(H, 2 * F).to(dtype)
    a2, w2 = torch.randn(routed, F).to(dtype), torch.randn(F, H).to(dtype)
    g1, g2 = torch.randn(routed, 2 * F).to(dtype), torch.randn(routed, H).to(dtype)

    def run():
        torch.mm(a1, w1), torch.mm(g1, w1.t()), torch.mm(a1.t(), g1)
        torch.mm(a2, w2), torch.mm(g2, w2.t()), torch.mm(a2.t(), g2)
    return run
