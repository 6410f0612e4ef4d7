#!/usr/bin/env bash
# Submits a flamingo_jax module to a Slurm GPU cluster (launch/slurm_gpu.sbatch
# on every node).
#
#   bash launch/slurm_gpu.sh [OPTIONS] [--] MODULE [ARGS...]
#
#   bash launch/slurm_gpu.sh --nodes 2 --gpus-per-node 8 -- \
#       flamingo_jax.train --config experiments/flamingo.py:3B \
#       --workdir /shared/runs/3b
#
# Options:
#   --nodes N            nodes (1)
#   --gpus-per-node G    GPUs per node (8)
#   --partition P        Slurm partition
#   --account A          Slurm account
#   --time T             time limit (24:00:00)
#   --job-name NAME      job name (flamingo_jax)
#   --dry-run            print the sbatch command, and the srun command the
#                        job will run, instead of submitting
#
# ARGS reach the module on every node exactly as given here (sbatch passes
# them to the batch script as separate words).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/_lib.sh
source "$HERE/_lib.sh"

usage() { sed -n '2,23s/^# \{0,1\}//p' "$0"; }
NODES=1
GPUS=8
TIME="24:00:00"
JOB="flamingo_jax"
extra=()
while (($#)); do
  case "$1" in
    --nodes|--nodes=*) NODES="$(option_value "$@")" ;;
    --gpus-per-node|--gpus-per-node=*) GPUS="$(option_value "$@")" ;;
    --partition|--partition=*) extra+=(--partition="$(option_value "$@")") ;;
    --account|--account=*) extra+=(--account="$(option_value "$@")") ;;
    --time|--time=*) TIME="$(option_value "$@")" ;;
    --job-name|--job-name=*) JOB="$(option_value "$@")" ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1; see --help" ;;
    *) break ;;
  esac
  shift "$(option_width "$1")"
done
(($#)) || die "no module to run (e.g. flamingo_jax.train ...); see --help"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be >= 1"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be >= 1"

cd "$HERE/.."  # SLURM_SUBMIT_DIR: the batch script runs from the checkout.
note "$NODES nodes x $GPUS GPUs: $((NODES * GPUS)) JAX processes, one per GPU"
run sbatch --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" \
  --time="$TIME" --job-name="$JOB" ${extra[@]+"${extra[@]}"} \
  launch/slurm_gpu.sbatch "$@"
if [[ "$DRY_RUN" == 1 ]]; then
  note "then, inside the job:"
  SLURM_JOB_NUM_NODES="$NODES" SLURM_NTASKS_PER_NODE="$GPUS" \
    SLURM_SUBMIT_DIR="$PWD" \
    bash launch/slurm_gpu.sbatch --dry-run "$@"
fi
