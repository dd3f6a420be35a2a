#!/bin/bash
# SLURM: start a Ray head on the first node of the allocation and a Ray worker on each other
# node (as Ray's SLURM guide does), then run the pipeline's driver on the head node.
#   sbatch cluster/slurm.sh [key=value ...]      (run from the project folder)
# The shared filesystem ($SHARED) holds Ray Train's checkpoints, the run's outputs and the
# cluster's auth token; every node must see it (NFS, Lustre, GPFS...).
#SBATCH --job-name=transferline
#SBATCH --nodes=2
#SBATCH --exclusive
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-task=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
# SIGTERM to this script 180 s before the time limit; it passes it on to the driver, which makes
# stage one commit a checkpoint at the next step and exit 143. `sbatch` the same script (same
# RUN_NAME) to resume there, or add --requeue and requeue below.
#SBATCH --signal=B:TERM@180
#SBATCH --output=transferline-%j.log

set -euo pipefail

CONFIG=${CONFIG:-configs/demo.yaml}
RUN_NAME=${RUN_NAME:-transferline-$SLURM_JOB_ID}
SHARED=${SHARED:-/shared/$USER/transferline}
PORT=${RAY_PORT:-6379}
GPUS_PER_NODE=${SLURM_GPUS_PER_TASK:-4}
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-32}

mkdir -p "$SHARED/runs" "$SHARED/ray"
# Activate the environment that has transferline installed (pip install -e .), e.g.:
# source "$HOME/venvs/transferline/bin/activate"

# One token for the allocation, on the shared filesystem, readable by this user only.
# Every ray process (srun passes the environment on) and the driver read it.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$SHARED/.ray-auth-token-$SLURM_JOB_ID"
(umask 077 && python -c "import secrets; print(secrets.token_hex(32))" > "$RAY_AUTH_TOKEN_PATH")
trap 'rm -f "$RAY_AUTH_TOKEN_PATH"' EXIT

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
echo "Ray head: $head_node ($head_ip:$PORT), ${#nodes[@]} node(s)"

# The dashboard (job API) listens on loopback only.
srun --nodes=1 --ntasks=1 -w "$head_node" \
  ray start --head --node-ip-address="$head_ip" --port="$PORT" --dashboard-host=127.0.0.1 \
  --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats --block &
sleep 15

for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$head_ip:$PORT" \
    --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats --block &
  sleep 5
done

# The driver: one Ray Train worker per GPU of the allocation. In the background, so that this
# shell can pass SLURM's early SIGTERM (--signal above) on to it.
transferline run "$CONFIG" \
  name="$RUN_NAME" \
  output_dir="$SHARED/runs/$RUN_NAME" \
  launcher.address="$head_ip:$PORT" \
  launcher.num_workers=$(( ${#nodes[@]} * GPUS_PER_NODE )) \
  launcher.use_gpu=true \
  launcher.cpus_per_worker=$(( CPUS_PER_NODE / GPUS_PER_NODE )) \
  launcher.storage_path="$SHARED/ray" \
  failure.max_failures=3 \
  failure.max_preemption_failures=10 \
  "$@" &
driver=$!
trap 'echo "SIGTERM: asking the driver to checkpoint and stop"; kill -TERM "$driver"' TERM
status=0
wait "$driver" || status=$?
if [ "$status" -gt 128 ] && kill -0 "$driver" 2>/dev/null; then  # wait was cut short by the trap
  status=0
  wait "$driver" || status=$?
fi
exit "$status"
