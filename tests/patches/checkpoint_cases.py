"""The cases that checkpoint_worker.py runs on every rank (2 or 4 gloo processes).

Each phase returns [(case name, [problems])]; the worker reduces the problem counts over ranks.
Grouped experts are the ones the plugin builds (the legacy GroupedMLP on megatron-core <= 0.16,
GmmGroupedMLP on 0.17+); "plugin off" is Megatron's own SequentialMLP. The conversion between the
two layouts here is the test's own (mcore_helpers' docstring), not the code under test.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import checkpoint_helpers as ch
import mcore_helpers as h
import patches
from patches.cpu_platform import cuda_literals_on_cpu

EXPERTS = 4


def _modern():
    return h.version()[:2] >= (0, 17)


def _init_parallel(tp=1, etp=1, ep=1):
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)


def _shared_dir(workdir, name):
    path = os.path.join(workdir, name)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------
# layout: GmmGroupedMLP's state_dict / sharded_state_dict == SequentialMLP's (megatron-core 0.17+)

LAYOUTS = {2: [(2, 1, 1), (1, 1, 2), (2, 2, 1), (1, 1, 1)],   # (TP, expert TP, EP); expert DP = the rest
           4: [(2, 1, 2), (1, 1, 2), (2, 2, 1)]}
# One real torch_dist round trip (Megatron validates the replica ids when it saves); the interchange
# phase saves and loads at EP=2 as well.
ROUND_TRIP = {4: (2, 1, 2)}
PREFIX, OUTER = "decoder.layers.1.mlp.experts.", ((0, 1, 2),)  # what a TransformerBlock passes to layer 1 of 2
WHOLE = ((0, 0, 1),)  # a round trip saves a whole (one-layer) checkpoint


def _experts_pair(layout, glu, seed):
    tp, etp, ep = layout
    config = h.make_config(experts=EXPERTS, glu=glu, tensor_model_parallel_size=tp, expert_tensor_parallel_size=etp,
                           expert_model_parallel_size=ep, sequence_parallel=tp > 1)
    torch.manual_seed(seed)
    seq = h.build_sequential(EXPERTS // ep, config)
    grouped = h.build_grouped(EXPERTS // ep, config)
    h.copy_sequential_to_grouped(seq, grouped)
    return seq, grouped


def _same_state_dict(got, want) -> list[str]:
    if list(got) != list(want):
        return [f"state_dict keys {list(got)[:3]}... vs SequentialMLP's {list(want)[:3]}..."]
    bad = []
    for k in got:
        a, b = got[k], want[k]
        if not ((a is None and b is None) or (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype
                                              and torch.equal(a, b))):
            bad.append(f"state_dict[{k!r}] differs")
    return bad


def _layout_case(layout, glu, singleton) -> list[str]:
    seq, grouped = _experts_pair(layout, glu, seed=7)
    problems = _same_state_dict(grouped.state_dict(), seq.state_dict())
    metadata = {"singleton_local_shards": singleton}
    got = ch.sharded_records(grouped.sharded_state_dict(PREFIX, OUTER, dict(metadata)))
    want = ch.sharded_records(seq.sharded_state_dict(PREFIX, OUTER, dict(metadata)))
    return problems + ch.compare_records(got, want)


def _round_trip(layout, workdir) -> list[str]:
    """torch_dist, experts only: grouped -> a fresh SequentialMLP, and SequentialMLP -> fresh grouped."""
    from megatron.core import dist_checkpointing
    problems = []
    for direction in ("grouped_to_sequential", "sequential_to_grouped"):
        seq, grouped = _experts_pair(layout, True, seed=11)
        fresh_seq, fresh_grouped = _experts_pair(layout, True, seed=12)
        saver, loader = (grouped, fresh_seq) if direction.startswith("grouped") else (seq, fresh_grouped)
        path = _shared_dir(workdir, f"experts_{direction}_{'_'.join(map(str, layout))}")
        dist_checkpointing.save(saver.sharded_state_dict(PREFIX, WHOLE), path)
        loaded = dist_checkpointing.load(loader.sharded_state_dict(PREFIX, WHOLE), path)
        loader.load_state_dict({k[len(PREFIX):]: v for k, v in loaded.items()})
        want = seq.state_dict() if loader is fresh_seq else grouped.state_dict()
        problems += [f"{direction}: {p}" for p in _same_state_dict(loader.state_dict(), want)]
    return problems


def layout_phase(workdir):
    world = dist.get_world_size()
    results = []
    for layout in LAYOUTS[world]:
        tp, etp, ep = layout
        _init_parallel(tp, etp, ep)
        name = f"TP{tp}-ETP{etp}-EP{ep}-EDP{world // (etp * ep)}"
        for glu in (True, False):
            for singleton in (False, True):
                results.append((f"{name} glu={glu} singleton_local_shards={singleton}",
                                _layout_case(layout, glu, singleton)))
        if ROUND_TRIP.get(world) == layout:
            results.append((f"{name} torch_dist round trip", _round_trip(layout, workdir)))
    return results


# ----------------------------------------------------------------------------------------------
# a small GPT with MoE layers, Megatron's DDP and optimizer (EP=2 on 2 processes)

STEPS_BEFORE, STEPS_AFTER = 2, 2
VOCAB, SEQ, BATCH = 64, 16, 2


def build_model(grouped: bool, seed=1234):
    """GPTModel (2 MoE layers, 4 experts, top-2) + Megatron DDP + Megatron's Adam (fp32, not distributed).

    grouped: the plugin's experts (patches applied); else Megatron's own SequentialMLP (plugin
    disabled, the CPU shim kept)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    patches.revert()
    patches.apply({"backend": "torch", "cpu_shim": "on", "enabled": grouped})
    # <= 0.16 without grouped_gemm, only the plugin can build GroupedMLP: off means moe_grouped_gemm=False.
    spec_grouped = grouped or _modern()
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    config = h.make_config(experts=EXPERTS, topk=2, hidden=32, ffn=24, num_layers=2, num_attention_heads=4,
                           expert_model_parallel_size=dist.get_world_size(), moe_grouped_gemm=spec_grouped,
                           masked_softmax_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
                           apply_rope_fusion=False)
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=spec_grouped)
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ)
    kind = type(model.decoder.layers[0].mlp.experts).__name__
    expected = ("GroupedMLP", "GmmGroupedMLP") if grouped else ("SequentialMLP",)
    assert kind in expected, (kind, expected)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model)
    with cuda_literals_on_cpu():  # the optimizer's device='cuda' literals
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=0.0,
                                                     bf16=False, fp16=False, use_distributed_optimizer=False), [ddp])
    return model, ddp, opt


def train_step(ddp, opt, step) -> float:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(ids, pos, None, labels=ids).mean()
    loss.backward()
    ddp.finish_grad_sync()
    with cuda_literals_on_cpu():
        ok = opt.step()[0]
    assert ok, "optimizer step skipped"
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()


def _adam_state(opt, param):
    for sub in getattr(opt, "chained_optimizers", [opt]):
        state = sub.optimizer.state.get(param)
        if state is not None:
            return state
    raise KeyError("parameter not in the optimizer")


def sequential_named_state(model, opt) -> dict[str, torch.Tensor]:
    """{name in SequentialMLP's naming: tensor} for every parameter and its Adam moments
    (names '<param>', 'exp_avg/<param>', 'exp_avg_sq/<param>'); grouped experts split per expert
    by the test's own conversion (block e of weight1 / weight2, transposed)."""
    out = {}
    grouped = {id(m.weight1): m for m in model.modules() if hasattr(m, "weight1")}
    grouped.update({id(m.weight2): m for m in grouped.values()})
    for name, p in model.named_parameters():
        tensors = {"": p.detach()}
        state = _adam_state(opt, p)
        tensors.update({f"{k}/": v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")})
        module = grouped.get(id(p))
        for tag, t in tensors.items():
            if module is None:
                out[tag + name] = t.clone()
                continue
            base, which = name.rsplit(".", 1)
            n, hidden = module.num_local_experts, module.config.hidden_size
            blocks = t.view(n, hidden, -1) if which == "weight1" else t.view(n, -1, hidden)
            linear = "linear_fc1" if which == "weight1" else "linear_fc2"
            for e in range(n):
                out[f"{tag}{base}.local_experts.{e}.{linear}.weight"] = blocks[e].t().clone()
    return out


def compare_named(got, want, what) -> list[str]:
    if set(got) != set(want):
        return [f"{what}: names differ: {sorted(set(got) ^ set(want))[:4]}"]
    return [f"{what}: {k} differs" for k in sorted(want) if not torch.equal(got[k], want[k])]


def compare_losses(got, want, what, rtol=1e-5) -> list[str]:
    """fp32, the same math in another summation order: a few ulps per step. The first loss after a
    load depends on the weights only, the second on the Adam state too: with the moments zeroed
    after the load it is off by 1.2e-2 relative here (measured)."""
    bad = [f"{what}: loss {a!r} vs uninterrupted {b!r}" for a, b in zip(got, want)
           if not abs(a - b) <= rtol * abs(b)]
    return bad if len(got) == len(want) else [f"{what}: {len(got)} losses vs {len(want)}"]


def save_dist(model, opt, path):
    from megatron.core import dist_checkpointing
    model_sd = model.sharded_state_dict()
    with cuda_literals_on_cpu():
        optimizer_sd = opt.sharded_state_dict(model_sd)
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer_sd}, path)


def load_dist(model, opt, path):
    from megatron.core import dist_checkpointing
    model_sd = model.sharded_state_dict()
    with cuda_literals_on_cpu():
        state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(state, path)
    model.load_state_dict(loaded["model"])
    with cuda_literals_on_cpu():
        opt.load_state_dict(loaded["optimizer"])


def interchange_phase(workdir):
    """torch_dist: plugin on -> off and off -> on, weights and Adam moments exactly, then the next
    steps' losses against the uninterrupted run; torch format: the weights."""
    _init_parallel(ep=dist.get_world_size())
    results, models = [], {}
    for saver_grouped in (True, False):
        direction = "plugin on -> off" if saver_grouped else "plugin off -> on"
        model, ddp, opt = build_model(saver_grouped)
        for step in range(STEPS_BEFORE):
            train_step(ddp, opt, step)
        path = _shared_dir(workdir, "gpt_" + ("on_to_off" if saver_grouped else "off_to_on"))
        save_dist(model, opt, path)
        saved = sequential_named_state(model, opt)
        uninterrupted = [train_step(ddp, opt, step) for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]

        model2, ddp2, opt2 = build_model(not saver_grouped, seed=99)
        load_dist(model2, opt2, path)
        problems = compare_named(sequential_named_state(model2, opt2), saved, "after load")
        resumed = [train_step(ddp2, opt2, step) for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]
        problems = compare_losses(resumed, uninterrupted, "resumed") + problems  # losses first: the report keeps 6
        results.append((f"torch_dist {direction}: weights, Adam moments, next losses", problems))
        models[saver_grouped] = (model, opt)

    if not _modern():  # <= 0.16: the legacy GroupedMLP's torch format is its own (weight1 / weight2)
        return results
    # torch format: each rank's plain state_dict, across the two (now differently trained) models.
    for src_grouped in (True, False):
        (src, src_opt), (dst, dst_opt) = models[src_grouped], models[not src_grouped]
        file = os.path.join(workdir, f"torch_format_rank{dist.get_rank()}_{src_grouped}.pt")
        torch.save({"model": src.state_dict()}, file)
        dst.load_state_dict(torch.load(file, weights_only=False)["model"])
        want = {k: v for k, v in sequential_named_state(src, src_opt).items() if "/" not in k}
        got = {k: v for k, v in sequential_named_state(dst, dst_opt).items() if "/" not in k}
        direction = "plugin on -> off" if src_grouped else "plugin off -> on"
        results.append((f"torch format {direction}: weights", compare_named(got, want, "torch format")))
    # torch format optimizer state is keyed by parameter position: 2 stacked parameters per layer
    # against 2 per expert. Loading it across must fail loudly, never load moments into the wrong tensors.
    (_, grouped_opt), (_, seq_opt) = models[True], models[False]
    try:
        with cuda_literals_on_cpu():
            seq_opt.load_state_dict(grouped_opt.state_dict())
        problems = ["the plugin's torch-format optimizer state loaded into SequentialMLP's optimizer"]
    except ValueError as e:  # torch.optim: "... doesn't match the size of optimizer's group"
        problems = [] if "size of optimizer's group" in str(e) else [f"refused for another reason: {e}"]
    results.append(("torch format optimizer state across plugin on/off is refused", problems))
    return results


# ----------------------------------------------------------------------------------------------
# megatron-core 0.16 (legacy GroupedMLP with the plugin) writes; 0.17+ reads

def legacy_write_phase(workdir):
    """Run on <= 0.16: train with the plugin's GroupedMLP, save torch_dist, record what a reader must see."""
    _init_parallel(ep=dist.get_world_size())
    model, ddp, opt = build_model(True)
    for step in range(STEPS_BEFORE):
        train_step(ddp, opt, step)
    path = _shared_dir(workdir, "legacy")
    save_dist(model, opt, path)
    saved = sequential_named_state(model, opt)
    following = [train_step(ddp, opt, step) for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]
    torch.save({"state": saved, "losses": following, "version": h.version()},
               os.path.join(path, f"expected_rank{dist.get_rank()}.pt"))
    return [(f"megatron-core {'.'.join(map(str, h.version()))} GroupedMLP + plugin wrote torch_dist", [])]


def legacy_read_phase(workdir):
    """Run on 0.17+: load the legacy checkpoint with the plugin (GmmGroupedMLP) and without (SequentialMLP)."""
    _init_parallel(ep=dist.get_world_size())
    path = os.path.join(workdir, "legacy")
    expected = torch.load(os.path.join(path, f"expected_rank{dist.get_rank()}.pt"), weights_only=False)
    writer = ".".join(map(str, expected["version"]))
    results, losses = [], {}
    for grouped in (True, False):
        model, ddp, opt = build_model(grouped, seed=99)
        load_dist(model, opt, path)
        name = "GmmGroupedMLP" if grouped else "SequentialMLP"
        problems = compare_named(sequential_named_state(model, opt), expected["state"], "after load")
        losses[grouped] = [train_step(ddp, opt, step) for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]
        # Another megatron-core computes the same model: the writer's own next losses, to fp32 rounding.
        problems = compare_losses(losses[grouped], expected["losses"], f"{name} after {writer}", rtol=1e-5) + problems
        results.append((f"{writer} checkpoint -> {name}: weights, Adam moments, next losses", problems))
    return results


PHASES = {"layout": layout_phase, "interchange": interchange_phase,
          "legacy_write": legacy_write_phase, "legacy_read": legacy_read_phase}
