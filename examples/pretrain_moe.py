#!/usr/bin/env python
"""Pretrain a small MoE GPT with Megatron-core on real text; gmm-plugin experts on a flag.

    python examples/pretrain_moe.py --config configs/pretrain_tiny_cpu.yaml --use-gmm-plugin
    python examples/pretrain_moe.py --config configs/pretrain_tiny_cpu.yaml      # Megatron's experts
    torchrun --nproc-per-node 2 examples/pretrain_moe.py --config configs/pretrain_tiny_cpu.yaml \\
        --use-gmm-plugin --expert-parallel-size 2
    python examples/pretrain_moe.py --config ... --resume                        # after a crash

Megatron-core pieces: GPTModel with MoE layers (router, alltoall token dispatcher, experts),
DistributedDataParallel with fp32 main_grad buffers, get_megatron_optimizer (Adam) and
OptimizerParamScheduler, GPTDataset over an indexed dataset written by IndexedDatasetBuilder.
This file is the training loop; the rest is one module per concern beside it:
    moe_config.py      every key and its default, presets, flags, the resume check
    moe_runtime.py     device, processes, the plugin switch, RNG state
    moe_data.py        text -> byte tokens -> Megatron's indexed dataset, the batches of a step
    moe_model.py       the GPT and its implementation-independent initialization
    moe_checkpoint.py  atomic per-rank checkpoints
    moe_metrics.py     metrics.jsonl / .csv, summary.json, loss.png, progress lines, routing record
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):  # the moe_* modules, and patches/ from a source checkout
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import moe_checkpoint  # noqa: E402
import moe_config  # noqa: E402
import moe_data  # noqa: E402
import moe_metrics  # noqa: E402
import moe_model  # noqa: E402
import moe_runtime as rt  # noqa: E402


def main(argv=None) -> int:
    t_start = time.time()
    rt.quiet_known_notices()
    parser = moe_config.build_parser()
    args = parser.parse_args(argv)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, preset = moe_config.resolve_config(args, world_env)
        data_path = moe_config.check_data_path(cfg["data"]["path"])
        out_dir = os.path.abspath(cfg["output"]["dir"])
        ckpt_dir = os.path.join(out_dir, "checkpoints")
        resume_step = moe_config.check_resume(cfg, ckpt_dir, world_env) if args.resume else None
    except (moe_config.ConfigError, RuntimeError) as e:
        parser.exit(2, f"pretrain_moe.py: error: {e}\n")
    m, t = cfg["model"], cfg["train"]

    device = rt.pick_device(args.device)
    rt.prepare_device(device, t["cpu_threads"])
    ep = t["expert_parallel_size"]
    rank, world = rt.init_distributed(device, ep)
    is_main = rank == 0

    def log(msg: str) -> None:
        if is_main and not args.quiet:
            print(msg, flush=True)

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    plugin_cfg = rt.enable_plugin(args, preset, device, log)
    rt.seed_everything(t["seed"])
    try:
        prefix, dataset = moe_data.build_dataset(
            data_path, cfg["data"]["cache_dir"] or os.path.join(out_dir, "data"), data_cfg=cfg["data"],
            seq_length=m["seq_length"], num_samples=t["steps"] * t["global_batch_size"], seed=t["seed"],
            is_main=is_main, barrier=rt.barrier)
    except moe_data.DataError as e:
        sys.stderr.write(f"pretrain_moe.py: error: {e}\n")
        sys.exit(2)  # under torchrun the launcher then stops the other ranks

    model, tconfig = moe_model.build_model(cfg, device, plugin_cfg is not None, log)
    ddp_model = DistributedDataParallel(
        config=tconfig,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False),
        module=model)
    with rt.optimizer_context(device):
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t["lr"], min_lr=t["min_lr"], weight_decay=t["weight_decay"],
                            adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], clip_grad=t["clip_grad"],
                            bf16=m["dtype"] == "bf16", fp16=m["dtype"] == "fp16", params_dtype=tconfig.params_dtype,
                            use_distributed_optimizer=False),
            [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t["lr"], min_lr=t["min_lr"], lr_warmup_steps=t["warmup_steps"],
        lr_decay_steps=t["steps"], lr_decay_style=t["lr_decay_style"], start_wd=t["weight_decay"],
        end_wd=t["weight_decay"], wd_incr_steps=t["steps"], wd_incr_style="constant")

    dp_size, dp_group = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_group()
    batches = moe_data.Batches(dataset, t, parallel_state.get_data_parallel_rank(), dp_size, device)
    routing = moe_metrics.RoutingRecord(moe_model.routers(model), dp_group, dp_size)

    # Output folder: a fresh run starts clean; --resume continues from the last whole checkpoint.
    metrics = moe_metrics.MetricsLog(out_dir)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        if not args.resume:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            metrics.start_over()
        moe_checkpoint.clean_partial(ckpt_dir)
    rt.barrier()
    start_step = 0
    if resume_step is None:
        if args.resume:
            log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
            if is_main:
                metrics.start_over()
    else:
        state = moe_checkpoint.load(ckpt_dir, resume_step, rank)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rt.set_rng_state(state["rng"], device)
        start_step = state["step"]
        del state
        if is_main:
            metrics.keep_upto(start_step)
        log(f"resumed from {moe_checkpoint.rank_file(ckpt_dir, start_step, rank)} (step {start_step})")

    experts = moe_model.experts_description(model)
    tokens_per_step = t["global_batch_size"] * m["seq_length"]
    log(f"device {device} ({rt.DIST_BACKEND[device]}), {world} process(es), expert-parallel {ep}, "
        f"megatron-core {rt.mcore_version()}, torch {torch.__version__}")
    log(f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_experts']} experts "
        f"top-{m['moe_router_topk']}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on this "
        f"rank, {m['dtype']}; experts: {experts}{' [gmm-plugin]' if plugin_cfg is not None else ' [Megatron]'}")
    docs = len(dataset.dataset.sequence_lengths) if hasattr(dataset, "dataset") else "?"
    log(f"data: {cfg['data']['path']} -> {prefix} ({docs} documents); {t['steps']} steps x {tokens_per_step} "
        f"tokens, {batches.num_micro} micro-batch(es) of {t['micro_batch_size']}")

    progress = moe_metrics.Progress(t["steps"], tokens_per_step, t_start)
    for step in range(start_step, t["steps"]):
        t0 = time.time()
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        # As Megatron's schedule does: the loss (fp16: times the dynamic loss scale; 1 otherwise)
        # is averaged over micro-batches, and the MoE aux loss's gradient gets the same scale.
        loss_scale = optimizer.get_loss_scale()
        MoEAuxLossAutoScaler.set_loss_scale(loss_scale / batches.num_micro)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for micro in range(batches.num_micro):
            b = batches.get(step, micro)
            per_token = ddp_model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            loss = (per_token.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
            (loss / batches.num_micro * loss_scale).backward()
            loss_sum += loss.detach()
        finalize_model_grads([ddp_model])  # data-parallel (and expert-data-parallel) gradient reduction
        with rt.optimizer_context(device):
            ok, grad_norm, _ = optimizer.step()
        if ok:  # an fp16 overflow skips the update, and the schedule waits too (as in Megatron)
            scheduler.step(increment=1)
        loss_mean = loss_sum / batches.num_micro
        if dp_size > 1:
            dist.all_reduce(loss_mean, group=dp_group)
            loss_mean /= dp_size
        loss_val = float(loss_mean)  # the step's one wait for the device
        route, margin = routing.step()
        dt = time.time() - t0
        progress.step_done(dt)
        done, lr = step + 1, optimizer.param_groups[0]["lr"]
        if is_main:
            metrics.write({"step": done, "loss": loss_val, "lr": lr,
                           "grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not ok,
                           "routing": route, "router_margin": margin, "step_time_s": round(dt, 4),
                           "tokens_per_s": round(tokens_per_step / dt, 1)})
        if not math.isfinite(loss_val):
            raise SystemExit(f"step {done}: loss is {loss_val}; stopping (lower train.lr?)")
        if done % cfg["output"]["log_interval"] == 0 or done in (start_step + 1, t["steps"]):
            log(progress.line(done, loss_val, lr, grad_norm))
        save_every = cfg["output"]["save_interval"]
        if save_every and (done % save_every == 0 or done == t["steps"]):
            state = {"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rt.rng_state(device), "config": cfg,
                     "world_size": world, "plugin": None if plugin_cfg is None else plugin_cfg.to_dict()}
            moe_checkpoint.save(ckpt_dir, done, rank, state, barrier=rt.barrier,
                                keep=cfg["output"]["keep_checkpoints"],
                                meta={"step": done, "config": cfg, "world_size": world})
    metrics.close()

    if is_main:
        title = (f"MoE GPT, {m['num_experts']} experts top-{m['moe_router_topk']}, "
                 f"{'gmm-plugin' if plugin_cfg is not None else 'Megatron'} experts, EP {ep}")
        rows = metrics.rows()
        s = moe_metrics.write_outputs(
            out_dir, rows, {"wall_time_s": round(time.time() - t_start, 1), "device": device, "processes": world,
                            "expert_parallel_size": ep, "plugin": plugin_cfg is not None, "experts": experts,
                            "megatron_core": rt.mcore_version()},
            plot_title=title if cfg["output"]["plot"] else None)
        if rows:
            print(moe_metrics.done_line(s, out_dir), flush=True)
    rt.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
