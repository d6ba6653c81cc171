#!/usr/bin/env bash
# Pretrain a small MoE GPT with Megatron-LM's own pretrain_gpt.py, its experts on gmm-plugin.
# A template: adjust the model and data flags to your run. Guide: examples/megatron_lm.md.
#
#   MEGATRON_LM=/path/to/Megatron-LM DATA_PREFIX=/data/my-corpus_text_document \
#   VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt bash examples/run_megatron_lm.sh [more flags]
#
# Environment: NPROC (GPUs/NPUs per node, 8), EP (expert-parallel size, 2), GMM_CONFIG (plugin
# YAML; configs/gmm_gpu.yaml, or configs/gmm_npu.yaml on Ascend), CKPT_DIR (checkpoints),
# GMM=0 (Megatron's own experts instead of the plugin's, for comparison; same checkpoints).
# Without DATA_PREFIX: Megatron's mock data and NullTokenizer (a smoke run, e.g. on a CPU machine,
# where the launcher adds the CPU flags itself; examples/megatron_lm.md section 5).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout whose megatron/core matches the installed megatron-core}"
DATA_PREFIX=${DATA_PREFIX:-}  # a Megatron indexed dataset prefix (tools/preprocess_data.py output, without .bin/.idx)
if [ -n "$DATA_PREFIX" ]; then
  : "${VOCAB_FILE:?set VOCAB_FILE (GPT-2 BPE vocab)}"
  : "${MERGE_FILE:?set MERGE_FILE (GPT-2 BPE merges)}"
fi
NPROC=${NPROC:-8}
EP=${EP:-2}
GMM_CONFIG=${GMM_CONFIG:-$ROOT/configs/gmm_gpu.yaml}
CKPT_DIR=${CKPT_DIR:-$ROOT/runs/megatron_lm_moe}
export PYTHONPATH="$ROOT:$MEGATRON_LM:${PYTHONPATH:-}"
export CUDA_DEVICE_MAX_CONNECTIONS=1

MODEL=(
  --num-layers 12 --hidden-size 768 --num-attention-heads 12 --ffn-hidden-size 3072
  --seq-length 2048 --max-position-embeddings 2048 --position-embedding-type rope
  --swiglu --disable-bias-linear --normalization RMSNorm --untie-embeddings-and-output-weights
)
MOE=(
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 1536 --moe-aux-loss-coeff 1e-2
  --moe-token-dispatcher-type alltoall --expert-model-parallel-size "$EP"
  # The experts gmm-plugin patches are Megatron's own grouped MLP (legacy GroupedMLP up to
  # megatron-core 0.16, the SequentialMLP fallback from 0.17): build the layers without
  # Transformer Engine's grouped experts. With TE on 0.12-0.16, --moe-use-legacy-grouped-gemm
  # instead of --transformer-impl local keeps TE for the rest of the layer.
  --transformer-impl local
)
TRAIN=(
  --micro-batch-size 4 --global-batch-size 256 --train-iters 20000
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 500
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --bf16
  --no-gradient-accumulation-fusion   # Megatron's own (dense layers) needs APEX's CUDA extension
)
if [ -n "$DATA_PREFIX" ]; then
  DATA=(--data-path "$DATA_PREFIX" --split 99,1,0
        --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE")
else
  DATA=(--mock-data --tokenizer-type NullTokenizer --vocab-size 4096 --split 99,1,0)
fi
OUTPUT=(
  --log-interval 10 --save-interval 1000 --eval-interval 1000 --eval-iters 10
  --save "$CKPT_DIR" --load "$CKPT_DIR"
)
PLUGIN=(
  --moe-grouped-gemm --use-gmm-plugin --gmm-plugin-config "$GMM_CONFIG"
  --gemm-gradient-accumulation-fusion   # expert dW accumulated straight into main_grad
)
[ "${GMM:-1}" = 0 ] && PLUGIN=()        # Megatron's own experts (SequentialMLP)

# examples/megatron_lm_launch.py = pretrain_gpt.py with `import patches.megatron_adaptor` first.
exec torchrun --nproc-per-node "$NPROC" "$ROOT/examples/megatron_lm_launch.py" "$MEGATRON_LM/pretrain_gpt.py" \
  "${MODEL[@]}" "${MOE[@]}" "${TRAIN[@]}" "${DATA[@]}" "${OUTPUT[@]}" "${PLUGIN[@]}" "$@"
