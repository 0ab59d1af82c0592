#!/usr/bin/env bash
# Two hosts (one or more GPUs each): tf.distribute.MultiWorkerMirroredStrategy, configured by TF_CONFIG.
#
# Start the same command on both hosts, each with its own index (worker 0 is the chief: it writes the run
# folder that matters; the other worker writes its copy into its own folder):
#   host A$ HOSTS=10.0.0.1:12345,10.0.0.2:12345 bash examples/distributed/two_host.sh 0
#   host B$ HOSTS=10.0.0.1:12345,10.0.0.2:12345 bash examples/distributed/two_host.sh 1
# The port must be free and reachable between the hosts; both must see the data (same TFDS data_dir or a
# shared folder). --batch-size is the global batch over all GPUs of all hosts (here 2 hosts x 1 GPU x 32).
# XLA stays off under multiworker (cross-worker all-reduce under XLA fails, tensorflow#58961).
set -euo pipefail
cd "$(dirname "$0")/../.."
TLKIT=${TLKIT:-tlkit}
INDEX=${1:?usage: two_host.sh TASK_INDEX  (0 on the chief host, 1 on the other)}
shift
HOSTS=${HOSTS:-10.0.0.1:12345,10.0.0.2:12345}
IFS=, read -r HOST0 HOST1 <<< "$HOSTS"

TF_CONFIG=$(printf '{"cluster": {"worker": ["%s", "%s"]}, "task": {"type": "worker", "index": %d}}' \
  "$HOST0" "$HOST1" "$INDEX")
export TF_CONFIG
echo "TF_CONFIG=$TF_CONFIG"

"$TLKIT" finetune --config examples/finetune_flowers.yaml \
  --distribute multiworker --xla off --batch-size 64 --lr 2e-3 \
  --output-dir "${OUT:-runs/flowers102-resnet50-2host}/worker$INDEX" "$@"
