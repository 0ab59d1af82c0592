#!/usr/bin/env bash
# One host, two GPUs: data-parallel fine-tuning with tf.distribute.MirroredStrategy.
#
#   bash examples/distributed/two_gpu.sh                         # GPUs 0 and 1
#   CUDA_VISIBLE_DEVICES=2,3 bash examples/distributed/two_gpu.sh
#
# --batch-size is the GLOBAL batch: 64 here means 32 per GPU, the same per-GPU batch as the single-GPU
# configuration. The learning rate follows the linear scaling rule (Goyal et al., 2017): twice the batch, twice
# the rate (1e-3 at 32 -> 2e-3 at 64). With --distribute auto, tlkit picks mirrored by itself whenever more than
# one GPU is visible; it is spelled out here.
set -euo pipefail
cd "$(dirname "$0")/../.."
TLKIT=${TLKIT:-tlkit}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}

"$TLKIT" finetune --config examples/finetune_flowers.yaml \
  --distribute mirrored --batch-size 64 --lr 2e-3 \
  --output-dir "${OUT:-runs/flowers102-resnet50-2gpu}" "$@"
