#!/usr/bin/env bash
# Submit a recipe with the node count, GPUs per node and time limit of its `slurm:` block:
#
#   bash slurm/submit.sh experiment=alfworld_qwen2_5_72b [more hydra overrides]
#   bash slurm/submit.sh --array=0-3 -- experiment=alfworld_qwen2_5_7b   # extra sbatch options before --
#   SDAR_DRY_RUN=1 bash slurm/submit.sh experiment=...                     # check, then print the sbatch command
#   bash slurm/submit.sh --rehearse experiment=alfworld_qwen2_5_72b        # rehearse it here, on CPU
#
# Before anything is queued, the job's configuration is checked here, on the login node:
# `python -m megatron_sdar.train <overrides> --check` (through tools/run.sh) composes and validates
# it without the model files, on the job's world size (nodes x GPUs per node), with the run
# directory and `trainer.resume=auto` the job adds; with SDAR_SWEEP, once per line of the sweep.
# A refused configuration is the trainer's one line (`megatron-sdar: configuration error: ...`) and
# exit code 2; without `sbatch` on PATH (and no SDAR_DRY_RUN=1) it is one line and 127. In both
# cases nothing is submitted and nothing is written.
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

if [[ "${SDAR_DRY_RUN:-0}" != "1" ]] && ! command -v sbatch >/dev/null 2>&1; then
    echo "submit.sh: sbatch is not on PATH: submit from a Slurm login node (SDAR_DRY_RUN=1 checks the" \
         "configuration and prints the sbatch command instead); nothing was submitted" >&2
    exit 127
fi

# The job as sbatch will start it: its options after the recipe's win (sbatch takes the last).
JOB_NAME="sdar-$EXPERIMENT" JOB_NODES="$NODES" JOB_GPUS="$GPUS" ARRAY=""
for opt in "${SBATCH_OPTS[@]}"; do
    case "$opt" in
        --nodes=*) [[ "${opt#*=}" =~ ^[0-9]+$ ]] && JOB_NODES="${opt#*=}" ;;
        --gpus-per-node=*) [[ "${opt#*=}" =~ ^[0-9]+$ ]] && JOB_GPUS="${opt#*=}" ;;
        --job-name=*) JOB_NAME="${opt#*=}" ;;
        --array* | -a*) ARRAY=1 ;;
    esac
done
OUTPUT_ROOT="${SDAR_OUTPUT_ROOT:-outputs}"
[[ "$OUTPUT_ROOT" == /* ]] || OUTPUT_ROOT="$PWD/$OUTPUT_ROOT"  # the job runs here; tools/run.sh runs in $ROOT
RUN_DIR="$OUTPUT_ROOT/$JOB_NAME-%j"  # the run directory sdar.sbatch adds (%j: the job id)

# `--check` of the job's overrides ($2...) with what sdar.sbatch adds; $1 prefixes its one line
check_config() {
    local label="$1" out rc
    shift
    out=$(WORLD_SIZE=$((JOB_NODES * JOB_GPUS)) bash "$ROOT/tools/run.sh" -m megatron_sdar.train "$@" \
          "trainer.output_dir=$RUN_DIR" trainer.resume=auto "hydra.run.dir=$RUN_DIR/hydra" --check 2>&1) && rc=0 || rc=$?
    if [[ "$rc" -eq 0 ]]; then
        echo "$label$(grep '^configuration ok' <<<"$out")"
        return 0
    fi
    local refusal
    refusal=$(grep '^megatron-sdar: configuration error: ' <<<"$out") || true
    if [[ -n "$refusal" ]]; then
        echo "$label$refusal" >&2
    else
        echo "$out" >&2
        echo "submit.sh: ${label}the configuration check failed (exit $rc); nothing was submitted" >&2
    fi
    exit "$rc"
}
if [[ -n "${SDAR_SWEEP:-}" ]]; then
    # sdar.sbatch adds line SLURM_ARRAY_TASK_ID of the sweep to each array task: check every line
    [[ -f "$SDAR_SWEEP" ]] || { echo "submit.sh: SDAR_SWEEP=$SDAR_SWEEP: no such file" >&2; exit 2; }
    [[ -n "$ARRAY" ]] || { echo "submit.sh: SDAR_SWEEP needs a job array: pass --array=0-N -- before the overrides" >&2; exit 2; }
    mapfile -t SWEEP_LINES < <(grep -vE '^[[:space:]]*(#|$)' "$SDAR_SWEEP")
    for ((i = 0; i < ${#SWEEP_LINES[@]}; i++)); do
        read -ra SWEEP_OVERRIDES <<<"${SWEEP_LINES[$i]}"
        check_config "SDAR_SWEEP entry $i (${SWEEP_LINES[$i]}): " "$@" "${SWEEP_OVERRIDES[@]}"
    done
else
    check_config "" "$@"
fi

CMD=(sbatch --job-name="sdar-$EXPERIMENT" --nodes="$NODES" --gpus-per-node="$GPUS" --ntasks-per-node="$GPUS"
     --time="$TIME" "${SBATCH_OPTS[@]}" "$ROOT/slurm/sdar.sbatch" "$@")
if [[ "${SDAR_DRY_RUN:-0}" == "1" ]]; then
    echo "[dry-run] ${CMD[*]}"
    exit 0
fi
mkdir -p logs
exec "${CMD[@]}"
