"""Worker of test_parallel_layouts.py: 2 or 4 gloo processes (started by checkpoint_helpers.launch).

    parallel_layouts_worker.py          (the layouts are LAYOUTS[world size])

For every (TP, expert TP, EP) layout, on every rank, the plugin's experts and Megatron's own built
from the same weights: on megatron-core 0.17+ GmmGroupedMLP against SequentialMLP; on 0.12-0.16 the
legacy GroupedMLP with the plugin's forward against the same class with Megatron's own forward, a
per-expert loop standing in for grouped_gemm. Each is wrapped in Megatron's DDP (fp32 main_grad,
gemm_fusion on for the plugin), runs one forward and backward on the rank's own tokens (the last
rank has none), then DDP's gradient sync. Compared per rank:

  - the output and the gradients of the tokens and of the router probabilities;
  - every expert weight's main_grad after the sync (the `allreduce` attribute decides which group
    reduces it: a wrong one leaves a rank's gradient out or counts it twice);
  - the attributes DDP, the optimizer and the grad norm read (allreduce, tensor_model_parallel,
    partition_dim), against SequentialMLP's linears, with and without perform_initialization;
  - 0.17+: the sharded state dict (keys, shapes, offsets, replica ids, data) against SequentialMLP's.

fp32 throughout; tolerance 1e-5 relative (the same products summed in another order, ~1e-7).
Prints "OK layouts: <case>" on rank 0 for a case that passed on every rank and
"FAIL rank R layouts: <case>: <problems>" where it did not; exits 1 on any failure.
"""
import contextlib
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint_helpers as ch  # noqa: E402
import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402

EXPERTS, TOL = 4, 1e-5
# (TP, expert TP, EP); expert DP is the rest of the world. Each has ETP != TP or EP > 1 somewhere.
LAYOUTS = {2: [(2, 1, 1), (1, 1, 2), (2, 2, 1), (1, 2, 1)],
           4: [(2, 1, 2), (1, 2, 2), (2, 2, 1), (2, 1, 1)]}
PREFIX, OUTER = "decoder.layers.0.mlp.experts.", ((0, 0, 1),)
LEGACY = patches.version_rules().legacy_grouped_mlp


def layout_name(layout, world):
    tp, etp, ep = layout
    return f"TP{tp}-ETP{etp}-EP{ep}-EDP{world // (etp * ep)}"


# ----------------------------------------------------------------------------------------------
# Megatron's own experts


LOOP_CALLS = [0]


def _loop_gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm as a loop of per-expert matmuls (the test's stand-in for the kernel)."""
    LOOP_CALLS[0] += 1
    parts = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ (w.t() if trans_b else w) for x, w in zip(parts, b)])


@contextlib.contextmanager
def _megatron_grouped_gemm():
    from megatron.core.transformer.moe import grouped_gemm_util as gg
    saved, gg.ops = gg.ops, types.SimpleNamespace(gmm=_loop_gmm)
    try:
        yield
    finally:
        gg.ops = saved


def _legacy_reference_class(megatron_forward):
    """GroupedMLP with Megatron's forward (the plugin replaces the class's own)."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    class MegatronGroupedMLP(GroupedMLP):
        def forward(self, *args, **kwargs):
            with _megatron_grouped_gemm():
                return megatron_forward(self, *args, **kwargs)

    return MegatronGroupedMLP


# ----------------------------------------------------------------------------------------------
# one layout


def _init_parallel(tp, etp, ep):
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)


def _config(layout, glu, init=True):
    tp, etp, ep = layout
    extra = dict(tensor_model_parallel_size=tp, expert_tensor_parallel_size=etp, expert_model_parallel_size=ep,
                 sequence_parallel=tp > 1, perform_initialization=init)
    if LEGACY:
        extra["bf16"] = True  # 0.16's GroupedMLP.forward asserts the flag; the parameters stay fp32
    return h.make_config(experts=EXPERTS, glu=glu, **extra)


def _build(cls, local, config):
    return cls(local, config, **h._pg_kwargs(cls))


def _pair(layout, glu, reference_cls):
    """(Megatron's experts, the plugin's) with the same weights."""
    config = _config(layout, glu)
    local = EXPERTS // layout[2]
    torch.manual_seed(7)
    ours = h.build_grouped(local, config)
    if LEGACY:
        ref = _build(reference_cls, local, config)
        with torch.no_grad():
            ours.weight1.copy_(ref.weight1)
            ours.weight2.copy_(ref.weight2)
    else:
        ref = h.build_sequential(local, config)
        h.copy_sequential_to_grouped(ref, ours)
    return config, ref, ours


def _ddp(config, module):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    return DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=module)


def _tokens(local, hidden):
    """This rank's tokens: counts with an empty expert, and none at all on the last rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(100 + rank)
    counts = torch.randint(1, 5, (local,), generator=g)
    counts[rank % local] = 0
    if rank == world - 1:
        counts.zero_()
    rows = int(counts.sum())
    return counts, torch.randn(rows, hidden, generator=g), torch.rand(rows, generator=g), \
        torch.randn(rows, hidden, generator=g)


def _step(ddp, counts, x, probs, dy):
    ddp.zero_grad_buffer()
    x = x.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    out, bias = ddp(x, counts, probs)
    assert bias is None
    (out * dy).sum().backward()
    ddp.finish_grad_sync()
    return {"output": out.detach(), "grad tokens": x.grad, "grad probs": probs.grad}


def _close(name, got, want) -> list[str]:
    if got.shape != want.shape:
        return [f"{name}: shape {tuple(got.shape)} vs Megatron's {tuple(want.shape)}"]
    if want.numel() == 0 or want.abs().max() == 0:
        return [] if torch.equal(got, torch.zeros_like(got)) else [f"{name}: Megatron's is zero, ours is not"]
    err = h.rel_err(got, want)
    return [] if err <= TOL else [f"{name}: relative error {err:.3g} > {TOL:g}"]


def _expert_weights(ref, ours):
    """[(name, ours, Megatron's equivalent parameters, (grouped, Megatron's) partition_dim)]."""
    if LEGACY:
        return [("weight1", ours.weight1, [ref.weight1], (1, 1)), ("weight2", ours.weight2, [ref.weight2], (0, 0))]
    return [("weight1", ours.weight1, [e.linear_fc1.weight for e in ref.local_experts], (1, 0)),
            ("weight2", ours.weight2, [e.linear_fc2.weight for e in ref.local_experts], (0, 1))]


def _main_grads(ref, ours) -> list[str]:
    problems = []
    n, hidden = ours.num_local_experts, ours.config.hidden_size
    for name, w, theirs, _ in _expert_weights(ref, ours):
        got = w.main_grad.view(n, hidden, -1) if name == "weight1" else w.main_grad.view(n, -1, hidden)
        want = theirs[0].main_grad.view_as(got) if LEGACY else torch.stack([t.main_grad.t() for t in theirs])
        problems += _close(f"main_grad of {name} after DDP's sync", got, want)
    return problems


def _attributes(ref, ours, what) -> list[str]:
    problems = []
    for name, w, theirs, (dim, their_dim) in _expert_weights(ref, ours):
        t = theirs[0]
        if getattr(w, "allreduce", None) != getattr(t, "allreduce", None):
            problems.append(f"{what}: {name}.allreduce={getattr(w, 'allreduce', None)} vs Megatron's "
                            f"{getattr(t, 'allreduce', None)}")
        their = getattr(t, "partition_dim", None)  # the grouped weights are transposed: dim maps
        for attr, want in (("tensor_model_parallel", getattr(t, "tensor_model_parallel", None)),
                           ("partition_dim", None if their is None else dim if their == their_dim else -1)):
            if getattr(w, attr, None) != want:
                problems.append(f"{what}: {name}.{attr}={getattr(w, attr, None)} where Megatron's gives {want}")
    return problems


def _attributes_without_init(layout, glu, reference_cls) -> list[str]:
    config = _config(layout, glu, init=False)
    local = EXPERTS // layout[2]
    ours = h.build_grouped(local, config)
    ref = _build(reference_cls, local, config) if LEGACY else h.build_sequential(local, config)
    return _attributes(ref, ours, "perform_initialization=False")


def _sharded_state_dict(ref, ours) -> list[str]:
    if LEGACY:  # the legacy class's own sharded_state_dict on both sides: nothing of the plugin's
        return []
    got = ch.sharded_records(ours.sharded_state_dict(PREFIX, OUTER))
    want = ch.sharded_records(ref.sharded_state_dict(PREFIX, OUTER))
    return [f"sharded state dict: {p}" for p in ch.compare_records(got, want)]


def layout_case(layout, glu, reference_cls) -> list[str]:
    config, ref, ours = _pair(layout, glu, reference_cls)
    problems = _attributes(ref, ours, "perform_initialization=True")
    counts, x, probs, dy = _tokens(ours.num_local_experts, config.hidden_size)
    calls = LOOP_CALLS[0]
    want = _step(_ddp(config, ref), counts, x, probs, dy)
    if LEGACY and x.shape[0] and LOOP_CALLS[0] == calls:
        problems.append("the reference did not run Megatron's GroupedMLP.forward")
    got = _step(_ddp(config, ours), counts, x, probs, dy)
    for key in want:
        problems += _close(key, got[key], want[key])
    problems += _main_grads(ref, ours)
    problems += _sharded_state_dict(ref, ours)
    return problems + _attributes_without_init(layout, glu, reference_cls)


def main():
    _, world = ch.init_worker()
    megatron_forward = None
    if LEGACY:
        from megatron.core.transformer.moe.experts import GroupedMLP
        megatron_forward = GroupedMLP.forward  # before apply() replaces it
    patches.apply({"backend": "torch", "gemm_fusion": True})
    reference_cls = _legacy_reference_class(megatron_forward) if LEGACY else None
    def cases():
        for layout in LAYOUTS[world]:
            _init_parallel(*layout)
            for glu in (True, False):
                try:
                    problems = layout_case(layout, glu, reference_cls)
                except Exception as e:  # one layout's error must not hide the others
                    problems = [f"{type(e).__name__}: {e}"]
                yield f"{layout_name(layout, world)} glu={glu}", problems

    try:
        failures = ch.run_cases("layouts", cases())
    finally:
        patches.revert()
    ch.finish_worker(failures)


if __name__ == "__main__":
    main()
