"""GmmGroupedMLP's checkpoints in the layout of Megatron's own SequentialMLP (megatron-core 0.17-0.19).

Megatron 0.17+ without Transformer Engine builds SequentialMLP for the experts, so its checkpoints
(and every checkpoint a run without the plugin writes) hold one MLP per expert. Everything here
makes GmmGroupedMLP read and write exactly that, while its parameters stay the two stacked
tensors the fused main_grad needs:

    weight1 [H, E*F'] = E contiguous [H, F'] blocks   <->  local_experts.{e}.linear_fc1.weight [F', H]
    weight2 [E*F, H]  = E contiguous [F, H] blocks    <->  local_experts.{e}.linear_fc2.weight [H, F]

(block e transposed; F' = 2F/tp with a gated linear unit, F/tp without; under expert tensor
parallelism each rank holds its own [W_r; V_r] rows of fc1 and columns of fc2, as SequentialMLP's
ColumnParallelLinear / RowParallelLinear do).

- `save_to_state_dict` / `load_from_state_dict`: the plain (`torch` format) state dict, with
  SequentialMLP's local keys, `_extra_state` (None) included. Loading also takes the legacy
  GroupedMLP keys `weight1` / `weight2` (checkpoints of megatron-core <= 0.16 and of this plugin
  before it wrote SequentialMLP's keys).
- `sharded_state_dict` (`torch_dist`): the ShardedTensors SequentialMLP produces (keys, local and
  global shapes, offsets, axis fragmentations, replica ids under TP, expert TP, EP and expert DP,
  `singleton_local_shards` too), made by one ShardedTensorFactory per parameter. Megatron's
  optimizers map their state onto model parameters by the factory's `data` and rebuild it with the
  factory's functions, so Adam moments (and fp32 master weights) are written per expert exactly
  like SequentialMLP's.
"""
from __future__ import annotations

import torch

FC1, FC2 = "linear_fc1", "linear_fc2"
LEGACY_KEYS = ("weight1", "weight2")


# ----------------------------------------------------------------------------------------------
# the geometry shared by both formats


def _group_rank_size(group):
    return (0, 1) if group is None else (group.rank(), group.size())


class _Layout:
    """Per-rank shapes of one GmmGroupedMLP and the view of each expert in SequentialMLP's terms."""

    def __init__(self, module):
        self.experts = module.num_local_experts
        self.hidden = module.weight1.shape[0]
        self.fc1_out = module.weight1.shape[1] // self.experts   # F' per rank
        self.fc2_in = module.weight2.shape[0] // self.experts    # F per rank
        self.glu = bool(module.config.gated_linear_unit)

    def place(self, module) -> "_Layout":
        """Where this rank's shard sits (for sharded_state_dict only: needs the process groups)."""
        self.ep_rank, self.ep_size = _group_rank_size(module.ep_group)
        self.tp_rank, self.tp_size = _group_rank_size(module.tp_group)
        self.dp_rank = _expert_dp_rank(module)
        self.first_expert = self.ep_rank * self.experts
        self.global_experts = self.ep_size * self.experts
        return self

    def fc1(self, weight1: torch.Tensor) -> torch.Tensor:
        """[E, F', H]: expert e's linear_fc1.weight (a view of weight1, or of a tensor shaped like it)."""
        return weight1.view(self.experts, self.hidden, self.fc1_out).transpose(1, 2)

    def fc2(self, weight2: torch.Tensor) -> torch.Tensor:
        """[E, H, F]: expert e's linear_fc2.weight."""
        return weight2.view(self.experts, self.fc2_in, self.hidden).transpose(1, 2)

    def fc1_shape(self):
        return (self.fc1_out, self.hidden)

    def fc2_shape(self):
        return (self.hidden, self.fc2_in)


def _expert_dp_rank(module) -> int:
    group = getattr(module, "dp_group", None)
    if group is not None:
        return group.rank()
    from megatron.core import parallel_state
    return parallel_state.get_expert_data_parallel_rank()


def _local_key(prefix: str, e: int, linear: str, name: str) -> str:
    return f"{prefix}local_experts.{e}.{linear}.{name}"


# ----------------------------------------------------------------------------------------------
# torch format: Module._save_to_state_dict / _load_from_state_dict


def save_to_state_dict(module, destination, prefix: str, keep_vars: bool) -> None:
    """SequentialMLP's entries for every local expert: views of weight1 / weight2, no copies."""
    layout = _Layout(module)
    w1, w2 = module.weight1, module.weight2
    if not keep_vars:
        w1, w2 = w1.detach(), w2.detach()
    fc1, fc2 = layout.fc1(w1), layout.fc2(w2)
    for e in range(layout.experts):
        destination[_local_key(prefix, e, FC1, "weight")] = fc1[e]
        destination[_local_key(prefix, e, FC1, "_extra_state")] = None
        destination[_local_key(prefix, e, FC2, "weight")] = fc2[e]
        destination[_local_key(prefix, e, FC2, "_extra_state")] = None


def load_from_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    """Load SequentialMLP's per-expert keys, or the legacy weight1 / weight2, into weight1 / weight2.

    Follows torch's conventions: size mismatches go to error_msgs, absent and unknown keys to
    missing_keys / unexpected_keys (load_state_dict raises on them when strict), and
    assign=True (local_metadata["assign_to_params_buffers"]) replaces the parameters.
    """
    layout = _Layout(module)
    legacy = {name: prefix + name for name in LEGACY_KEYS}
    per_expert = {(e, linear): _local_key(prefix, e, linear, "weight")
                  for e in range(layout.experts) for linear in (FC1, FC2)}
    extra = {_local_key(prefix, e, linear, "_extra_state") for e in range(layout.experts) for linear in (FC1, FC2)}
    known = set(legacy.values()) | set(per_expert.values()) | extra

    if strict:
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
    has_legacy = any(k in state_dict for k in legacy.values())
    has_per_expert = any(k in state_dict for k in per_expert.values())
    if has_legacy and has_per_expert:
        error_msgs.append(f"{prefix!r} holds both the legacy weight1/weight2 keys and SequentialMLP's "
                          "local_experts.* keys; a checkpoint has one layout or the other.")
        return

    assign = bool((local_metadata or {}).get("assign_to_params_buffers", False))
    if has_legacy:
        for name, key in legacy.items():
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            _load_param(module, name, state_dict[key], key, assign, error_msgs)
        return

    # One key per expert and linear, like SequentialMLP: load what is there (strict=False too),
    # report what is not; size mismatches are skipped, as torch does.
    views = {FC1: (layout.fc1, layout.fc1_shape(), "weight1"), FC2: (layout.fc2, layout.fc2_shape(), "weight2")}
    for linear, (view, shape, name) in views.items():
        present = {}
        for e in range(layout.experts):
            key = per_expert[(e, linear)]
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
            elif not torch.is_tensor(state_dict[key]) or tuple(state_dict[key].shape) != shape:
                got = tuple(state_dict[key].shape) if torch.is_tensor(state_dict[key]) else type(state_dict[key]).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {got} from checkpoint, "
                                  f"the shape in current model is {torch.Size(shape)}.")
            else:
                present[e] = state_dict[key]
        if not present:
            continue
        param = getattr(module, name)
        with torch.no_grad():
            target = param.detach().clone() if assign else param
            blocks = view(target)
            for e, value in present.items():
                blocks[e].copy_(value)
        if assign:
            _load_param(module, name, target, prefix + name, True, error_msgs)


def _load_param(module, name, value, key, assign, error_msgs) -> None:
    param = getattr(module, name)
    if not torch.is_tensor(value):
        error_msgs.append(f"{key}: expected a tensor, got {type(value).__name__}")
        return
    if value.shape != param.shape:
        error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                          f"checkpoint, the shape in current model is {param.shape}.")
        return
    with torch.no_grad():
        if assign:
            new = torch.nn.Parameter(value, requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)  # keep allreduce and the other Megatron attributes
            setattr(module, name, new)
        else:
            param.copy_(value)


# ----------------------------------------------------------------------------------------------
# torch_dist: sharded_state_dict


def sharded_state_dict(module, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
    """SequentialMLP.sharded_state_dict of the same weights, from weight1 / weight2.

    Dict keys: `{prefix}weight1` / `{prefix}weight2` (one ShardedTensorFactory each, so that
    optimizer state follows; loading merges back into these legacy keys, which
    load_from_state_dict takes) and SequentialMLP's `{prefix}local_experts.{e}.linear_fc*._extra_state`.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    layout = _Layout(module).place(module)
    singleton = bool((metadata or {}).get("singleton_local_shards", False))
    geometry = _ExpertShards(layout, tuple(sharded_offsets), singleton)
    weight_replica = (0, 0, layout.dp_rank)  # TP-sharded weights: TP coordinate 0; replicas over expert DP

    out = {}
    for name, linear in (("weight1", FC1), ("weight2", FC2)):
        out[f"{prefix}{name}"] = ShardedTensorFactory(
            geometry.factory_key(prefix, linear), getattr(module, name),
            geometry.build_fn(linear), geometry.merge_fn(linear), weight_replica)

    extra_replica = (0, layout.tp_rank, layout.dp_rank)  # ShardedObjects: one per TP rank
    for e in range(layout.experts):
        g = layout.first_expert + e
        for linear in (FC1, FC2):
            out[_local_key(prefix, e, linear, "_extra_state")] = make_sharded_object_for_checkpoint(
                None, geometry.expert_key(geometry.factory_key(prefix, linear), linear, g, "_extra_state"),
                geometry.expert_offsets(g), extra_replica)
    return out


class _ExpertShards:
    """Keys and offsets of SequentialMLP's per-expert ShardedTensors, and the factory functions."""

    def __init__(self, layout: _Layout, sharded_offsets: tuple, singleton: bool):
        self.layout, self.outer, self.singleton = layout, sharded_offsets, singleton

    # --- keys: `{prefix}experts.{linear}.weight`, or `{prefix}experts.{g}.{linear}.weight` (singleton)
    @staticmethod
    def factory_key(prefix: str, linear: str) -> str:
        return f"{prefix}experts.{linear}.weight"

    def expert_key(self, key: str, linear: str, g: int, name: str = "weight") -> str:
        """The per-expert key for a factory key (a model key, or an optimizer key that ends with one)."""
        suffix = f"experts.{linear}.weight"
        if not key.endswith(suffix):
            raise ValueError(f"unexpected ShardedTensorFactory key {key!r} (expected it to end with {suffix!r})")
        head = key[:-len(suffix)]
        return f"{head}experts.{g}.{linear}.{name}" if self.singleton else f"{head}experts.{linear}.{name}"

    # --- offsets: the expert axis is prepended unless singleton
    def expert_offsets(self, g: int) -> tuple:
        if self.singleton:
            return self.outer
        return (*self.outer, (len(self.outer), g, self.layout.global_experts))

    def _prepend(self) -> int:
        return len(self.outer) + (0 if self.singleton else 1)

    def build_fn(self, linear: str):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        layout = self.layout
        tp_rank, tp_size = layout.tp_rank, layout.tp_size

        @torch.no_grad()
        def build(key, t, replica_id, flattened_range):
            if flattened_range is not None:
                raise ValueError(f"{key}: flattened ShardedTensors are not supported by megatron-core 0.17+ "
                                 "(nor by SequentialMLP's checkpoint); use a distributed optimizer format "
                                 "other than a flattened one.")
            prepend = self._prepend()
            experts = layout.fc1(t) if linear == FC1 else layout.fc2(t)
            shards = []
            for e in range(layout.experts):
                g = layout.first_expert + e
                offsets = self.expert_offsets(g)
                k = self.expert_key(key, linear, g)

                def shard(k_, data, tp_offset):
                    return ShardedTensor.from_rank_offsets(k_, data, *offsets, tp_offset, replica_id=replica_id,
                                                           prepend_axis_num=prepend)
                if linear == FC2:  # RowParallelLinear: sharded along axis 1
                    shards.append(shard(k, experts[e], (prepend + 1, tp_rank, tp_size)))
                elif not layout.glu:  # ColumnParallelLinear: along axis 0
                    shards.append(shard(k, experts[e], (prepend, tp_rank, tp_size)))
                else:  # [W_r; V_r]: W and V sharded separately, as Megatron's swiglu factory does
                    w, v = torch.chunk(experts[e], 2, dim=0)
                    if self.singleton:
                        shards += [shard(k + "_w", w, (prepend, tp_rank, tp_size)),
                                   shard(k + "_v", v, (prepend, tp_rank, tp_size))]
                    else:
                        shards += [shard(k, w, (prepend, tp_rank, 2 * tp_size)),
                                   shard(k, v, (prepend, tp_size + tp_rank, 2 * tp_size))]
            return shards

        return build

    def merge_fn(self, linear: str):
        layout = self.layout
        per_expert = 2 if (linear == FC1 and layout.glu) else 1

        @torch.no_grad()
        def merge(loaded):
            if len(loaded) != layout.experts * per_expert:
                raise ValueError(f"expected {layout.experts * per_expert} loaded {linear} shards, got {len(loaded)}")
            parts = [torch.cat(loaded[i:i + per_expert], dim=0) if per_expert > 1 else loaded[i]
                     for i in range(0, len(loaded), per_expert)]
            stacked = torch.stack(parts).transpose(1, 2)  # [E, in, out]: the grouped blocks
            if linear == FC1:
                return stacked.reshape(layout.hidden, layout.experts * layout.fc1_out)
            return stacked.reshape(layout.experts * layout.fc2_in, layout.hidden)

        return merge
