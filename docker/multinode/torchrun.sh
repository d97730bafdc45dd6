#!/usr/bin/env bash
# Multi-node DDP with torchrun in the refvision image. Run it once on every node, from any folder:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=4 DATA=/shared/data RUNS=/shared/runs \
#       docker/multinode/torchrun.sh fit -c configs/detection/ssdlite320_mobilenet_v2_voc0712.yaml \
#       --trainer.default_root_dir runs/ssdlite
#
# (NODE_RANK=1 on the second node.) torchrun starts GPUS_PER_NODE processes per node and sets
# RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, from which Lightning's
# TorchElasticEnvironment takes the topology; the matching --trainer.devices / --trainer.num_nodes
# / --trainer.strategy ddp are appended to the refvision arguments. DATA (mounted read-only at
# /data: holds VOCdevkit/, cityscapes/ ...) and RUNS (at /runs) must be the same shared folders
# on every node. The host network is used so that NCCL reaches the other nodes.
set -euo pipefail

: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the rank of this node, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of the node with NODE_RANK=0}"
: "${DATA:?set DATA, the host folder mounted at /data}"
: "${RUNS:?set RUNS, the host folder mounted at /runs}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MASTER_PORT=${MASTER_PORT:-29500}
IMAGE=${IMAGE:-refvision:gpu}

exec docker run --rm --gpus all --network host --ipc host \
    --user "$(id -u):$(id -g)" \
    --volume "$DATA:/data:ro" --volume "$RUNS:/runs" \
    --entrypoint torchrun "$IMAGE" \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    --no-python refvision "$@" \
    --trainer.accelerator gpu --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "$NNODES" \
    --trainer.strategy ddp
