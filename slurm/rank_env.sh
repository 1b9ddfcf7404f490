#!/usr/bin/env bash
# Per-task wrapper: derive the torch.distributed environment from Slurm's task variables, then
# exec the command. `srun` starts one copy per GPU (srun mode) or per node (torchrun mode):
#
#   srun ... slurm/rank_env.sh python -m megatron_sdar.train experiment=...
#
# Inputs: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID (set by srun; the dry run
# simulates them), MASTER_ADDR and MASTER_PORT (exported by sdar.sbatch).
# SDAR_PRINT_ONLY=1 prints the environment and command instead of running it (dry run).
set -euo pipefail

for var in SLURM_PROCID SLURM_LOCALID SLURM_NTASKS MASTER_ADDR MASTER_PORT; do
    if [[ -z "${!var:-}" ]]; then
        echo "rank_env.sh: $var is not set (run under srun from slurm/sdar.sbatch)" >&2
        exit 2
    fi
done

if [[ "${SDAR_LAUNCHER:-srun}" == "torchrun" ]]; then
    # torchrun assigns RANK/LOCAL_RANK itself; this task only knows its node.
    export NODE_RANK="${SLURM_NODEID:-0}"
    unset RANK LOCAL_RANK WORLD_SIZE
    desc="node_rank=${NODE_RANK}"
else
    export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
    export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${SDAR_GPUS_PER_NODE:-1}}"
    desc="RANK=${RANK} LOCAL_RANK=${LOCAL_RANK} WORLD_SIZE=${WORLD_SIZE}"
fi

if [[ "${SDAR_PRINT_ONLY:-0}" == "1" ]]; then
    echo "[dry-run] host=${SDAR_HOST:-$(hostname)} ${desc} MASTER_ADDR=${MASTER_ADDR} MASTER_PORT=${MASTER_PORT} cmd: $*"
    exit 0
fi
exec "$@"
