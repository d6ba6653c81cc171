"""One rank of Megatron's own training loop (megatron.training.pretrain) on a CPU, for
test_megatron_training.py; run under torch.distributed.run.

    python -m torch.distributed.run --nproc-per-node 2 megatron_training_worker.py OUT.json \
        [--gmm-plugin] <Megatron flags>

The model provider (a tiny MoE GPTModel from Megatron's local layer spec), the data (a dataset of
seeded random tokens) and the forward step are the test's own; everything else (argument parsing,
initialize_megatron, the optimizer, the schedule, torch_dist checkpointing, the data loader and
sampler) is Megatron's. Each rank writes OUT.json.rank<N>: the loss of every micro-batch it ran,
with the iteration it belongs to, as float.hex() (bit-exact comparison).
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from patches import cpu_platform  # noqa: E402

# Module level on purpose: torch_dist saving starts a multiprocessing Manager with 'spawn', whose
# child re-imports this file as its main module; megatron.training (0.19) needs typing.override
# there too.
cpu_platform.ensure_typing_override()

import torch  # noqa: E402

SEQ = 32
VOCAB = 128
LOSSES: list[tuple[int, str]] = []


class RandomTokens(torch.utils.data.Dataset):
    """Sample i: SEQ + 1 tokens drawn from a generator seeded with i (the same on every run)."""

    def __init__(self, size: int, offset: int):
        self.size, self.offset = size, offset

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.offset + int(i))
        return {"text": torch.randint(0, VOCAB, (SEQ + 1,), generator=g)}


def datasets_provider(num_samples):
    sizes = [max(int(n), 1) for n in num_samples]
    return tuple(RandomTokens(n, offset=k * 1_000_000) for k, n in enumerate(sizes))


def model_provider(pre_process=True, post_process=True, config=None, **kwargs):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args
    args = get_args()
    config = config or core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm)
    extra = {k: v for k, v in kwargs.items() if k in ("vp_stage", "pg_collection")
             and k in inspect.signature(GPTModel.__init__).parameters}
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, position_embedding_type="rope", **extra)


def loss_func(loss_mask, output_tensor):
    from megatron.training import get_args
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    LOSSES.append((int(get_args().curr_iteration), (loss / num_tokens).item().hex()))
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    text = next(data_iterator)["text"]
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)  # None: Megatron's causal mask
    return output, partial(loss_func, torch.ones_like(labels))


def main():
    out = sys.argv[1]
    plugin = "--gmm-plugin" in sys.argv
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[2:] if a != "--gmm-plugin"]
    assert cpu_platform.enable_training(), "the training shim stays off with an accelerator"
    if plugin:
        import patches
        report = patches.apply({"enabled": True, "backend": "torch"})
        if os.environ.get("RANK") == "0":
            print(report, flush=True)
    from megatron.core.enums import ModelType
    from megatron.core.datasets import utils as dataset_utils
    from megatron.training import pretrain
    # The wheel ships the dataset helpers already built (helpers_cpp*.so) but not their Makefile,
    # and initialize_megatron runs `make` on rank 0 regardless; this test uses no Megatron dataset.
    dataset_utils.compile_helpers = lambda: None
    datasets_provider.is_distributed = True
    if next(iter(inspect.signature(pretrain).parameters)) == "cfg_container":  # 0.18+
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args
        args = parse_and_validate_args()
        pretrain(pretrain_cfg_container_from_args(args, None), datasets_provider, ModelType.encoder_or_decoder,
                 forward_step, model_provider=model_provider)
    else:
        pretrain(datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step)
    with open(f"{out}.rank{os.environ['RANK']}", "w") as f:
        json.dump(LOSSES, f)
    print(f"WORKER DONE rank {os.environ['RANK']}: {len(LOSSES)} micro-batches", flush=True)


if __name__ == "__main__":
    main()
