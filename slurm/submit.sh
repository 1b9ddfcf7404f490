#!/usr/bin/env bash
# Submit a recipe with the node count, GPUs per node and time limit of its `slurm:` block:
#
#   bash slurm/submit.sh experiment=alfworld_qwen2_5_72b [more hydra overrides]
#   bash slurm/submit.sh --array=0-3 -- experiment=alfworld_qwen2_5_7b   # extra sbatch options before --
#   SDAR_DRY_RUN=1 bash slurm/submit.sh experiment=...                     # print the sbatch command
#   bash slurm/submit.sh --rehearse experiment=alfworld_qwen2_5_72b        # rehearse it here, on CPU
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == "--rehearse" ]]; then
    # the recipe end to end on two local CPU processes (tiny model, its layout features at size 2),
    # before the queue sees it: megatron_sdar/trainer/rehearsal.py
    shift
    exec bash "$ROOT/tools/run.sh" -m megatron_sdar.train --rehearse "$@"
fi

SBATCH_OPTS=()
if [[ " $* " == *" -- "* ]]; then
    while [[ "$1" != "--" ]]; do SBATCH_OPTS+=("$1"); shift; done
    shift
fi
EXPERIMENT=""
for arg in "$@"; do
    [[ "$arg" == experiment=* || "$arg" == +experiment=* ]] && EXPERIMENT="${arg#*experiment=}"
done
[[ -n "$EXPERIMENT" ]] || { echo "submit.sh: pass experiment=<name> (see megatron_sdar/config/experiment/)" >&2; exit 2; }
YAML="$ROOT/megatron_sdar/config/experiment/$EXPERIMENT.yaml"
[[ -f "$YAML" ]] || { echo "submit.sh: no recipe $YAML" >&2; exit 2; }

# the values of the top-level `slurm:` block (two-space indented `key: value` lines)
slurm_value() {
    awk -v key="$1" '/^slurm:/ {in_block=1; next} /^[^ #]/ {in_block=0}
        in_block && $1 == key":" {v=$2; gsub(/"/, "", v); print v; exit}' "$YAML"
}
NODES=$(slurm_value nodes)
GPUS=$(slurm_value gpus_per_node)
TIME=$(slurm_value time)
[[ -n "$NODES" && -n "$GPUS" && -n "$TIME" ]] || { echo "submit.sh: $YAML lacks slurm.nodes/gpus_per_node/time" >&2; exit 2; }

CMD=(sbatch --job-name="sdar-$EXPERIMENT" --nodes="$NODES" --gpus-per-node="$GPUS" --ntasks-per-node="$GPUS"
     --time="$TIME" "${SBATCH_OPTS[@]}" "$ROOT/slurm/sdar.sbatch" "$@")
if [[ "${SDAR_DRY_RUN:-0}" == "1" ]]; then
    echo "[dry-run] ${CMD[*]}"
    exit 0
fi
mkdir -p logs
exec "${CMD[@]}"
