#!/usr/bin/env bash
# Runs a flamingo_jax module on TPU slices of a GKE cluster through XPK
# (large slices, and several slices at once: multislice).
#
#   bash launch/xpk.sh [OPTIONS] [--] MODULE [ARGS...]
#
#   bash launch/xpk.sh --cluster my-cluster --type v5p-128 --num-slices 2 \
#       -- flamingo_jax.train --config experiments/flamingo.py:80B \
#       --workdir gs://BUCKET/runs/80b
#
# Options (environment variable in brackets):
#   --cluster NAME       GKE cluster made by `xpk cluster create` [CLUSTER]
#   --type TYPE          TPU type of each slice, e.g. v5p-128 [TPU_TYPE]
#   --num-slices N       slices, joined over the data-centre network (1)
#   --workload NAME      workload name (default: flamingo-<user>-<time>)
#   --base-image IMAGE   image this checkout is copied into (python:3.11);
#                        launch/run_tpu.sh installs jax[tpu] and the package
#   --zone ZONE          zone [ZONE]
#   --project PROJECT    project (default: gcloud's) [PROJECT]
#   --dry-run            print the xpk command instead of running it
#
# XPK builds an image from --base-image and this checkout (its /app) and
# starts `bash launch/run_tpu.sh MODULE ARGS...` in one container per TPU
# host of every slice; jax.distributed.initialize() finds them all. With
# several slices the mesh's 'data' axis spans them (data-parallel over the
# data-centre network; fsdp and model stay inside a slice), so its size must
# be a multiple of the number of slices.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=launch/_lib.sh
source "$HERE/_lib.sh"

usage() { sed -n '2,28s/^# \{0,1\}//p' "$0"; }
CLUSTER="${CLUSTER:-}"
TYPE="${TPU_TYPE:-}"
SLICES=1
WORKLOAD=""
IMAGE="python:3.11"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
while (($#)); do
  case "$1" in
    --cluster|--cluster=*) CLUSTER="$(option_value "$@")" ;;
    --type|--type=*) TYPE="$(option_value "$@")" ;;
    --num-slices|--num-slices=*) SLICES="$(option_value "$@")" ;;
    --workload|--workload=*) WORKLOAD="$(option_value "$@")" ;;
    --base-image|--base-image=*) IMAGE="$(option_value "$@")" ;;
    --zone|--zone=*) ZONE="$(option_value "$@")" ;;
    --project|--project=*) PROJECT="$(option_value "$@")" ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1; see --help" ;;
    *) break ;;
  esac
  shift "$(option_width "$1")"
done
(($#)) || die "no module to run (e.g. flamingo_jax.train ...); see --help"
[[ -n "$CLUSTER" ]] || die "set --cluster (or CLUSTER)"
[[ -n "$TYPE" ]] || die "set --type (or TPU_TYPE), e.g. v5p-128"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be >= 1"
WORKLOAD="${WORKLOAD:-flamingo-${USER:-run}-$(date +%m%d-%H%M%S)}"

shape="$(tpu_chips_and_hosts "$TYPE")"
read -r chips hosts <<< "$shape"
note "$SLICES x $TYPE: $((SLICES * chips)) chips, $((SLICES * hosts))" \
  "containers ($hosts per slice), one JAX process each"
command="bash launch/run_tpu.sh $(quote "$@")"
note "in every container: $command"
xpk=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD"
  --tpu-type="$TYPE" --num-slices="$SLICES" --base-docker-image="$IMAGE"
  --script-dir="$REPO" --command="$command")
[[ -z "$ZONE" ]] || xpk+=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || xpk+=(--project="$PROJECT")
run "${xpk[@]}"
