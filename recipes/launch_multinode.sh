#!/usr/bin/env bash
# Launch one training job over several nodes with torchrun's c10d rendezvous. Run this script once on EVERY node
# (by hand, with pdsh, or as `srun --ntasks-per-node=1 recipes/launch_multinode.sh ...` under SLURM):
#
#   NNODES=4 MASTER_ADDR=node001 RDZV_ID=t2i-run1 \
#     recipes/launch_multinode.sh recipes/t2i_1b_8gpu.toml --parallel.dp_replicate=4 --run.dir=/shared/runs/t2i_1b
#
# Rendezvous flags it passes to torchrun (all nodes must agree on them):
#   --nnodes=$NNODES                number of nodes (SLURM: $SLURM_NNODES); "MIN:MAX" allows elastic membership
#   --nproc-per-node=$NPROC_PER_NODE  processes per node = GPUs per node (default: nvidia-smi count)
#   --rdzv-backend=c10d             the store is hosted by the torchrun agent on $MASTER_ADDR; no etcd needed
#   --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT  a host:port every node can reach (SLURM: the first node, port 29500)
#   --rdzv-id=$RDZV_ID              a job id shared by the nodes of one job (SLURM: $SLURM_JOB_ID)
#   --max-restarts=$MAX_RESTARTS    on a worker failure torchrun restarts every worker; with --resume they continue
#                                   from the newest complete checkpoint (default 0: fail the job)
# Node ranks are assigned by the rendezvous, so no NODE_RANK is needed.
#
# Parallel layout: parallel.dp_replicate = number of nodes gives HSDP (parameters sharded inside a node over NVLink,
# replicated across nodes: one gradient all-reduce per step crosses the network); leave it at 1 for FSDP over every
# GPU. run.dir must be on storage shared by all nodes (checkpoints are written by every rank). The global batch is
# nodes x GPUs x train.grad_accum x data.batch_rows rows; a checkpoint resumes its data position exactly under any
# layout with the same GPUs x grad_accum product (else --reset-data, see transfusion/distributed/data.py).
set -euo pipefail

RECIPE=${1:?usage: recipes/launch_multinode.sh RECIPE.toml [--section.key=value ...]}
shift

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to a host every node can reach (e.g. the first node)}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-transfusion}}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [[ "$NPROC_PER_NODE" -lt 1 ]]; then
  echo "error: no GPUs found on $(hostname); set NPROC_PER_NODE" >&2
  exit 2
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the job, no hang

exec torchrun \
  --nnodes="$NNODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$RDZV_ID" \
  --max-restarts="$MAX_RESTARTS" \
  -m transfusion.train "$RECIPE" "$@" --no-progress --resume
