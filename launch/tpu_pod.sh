#!/usr/bin/env bash
# Starts a flamingo_jax module on every worker of a Cloud TPU VM slice.
#
#   bash launch/tpu_pod.sh [OPTIONS] [--] MODULE [ARGS...]
#
#   bash launch/tpu_pod.sh --name my-v4-32 --zone us-central2-b \
#       --type v4-32 --create -- flamingo_jax.train \
#       --config experiments/flamingo.py:3B --workdir gs://BUCKET/runs/3b
#
# Options (environment variable in brackets):
#   --name NAME        TPU VM (and queued resource) name [TPU_NAME]
#   --zone ZONE        zone [ZONE]
#   --project PROJECT  project (default: gcloud's) [PROJECT]
#   --type TYPE        accelerator type, e.g. v4-32, v5p-128, v5litepod-16,
#                      v6e-64 [ACCELERATOR_TYPE]; needed with --create
#   --create           request the slice as a queued resource first and wait
#                      until it is ACTIVE
#   --spot             with --create: Spot capacity (can be preempted)
#   --runtime VERSION  with --create: TPU software version (default: the
#                      one for JAX on that generation)
#   --no-copy          do not copy this checkout to the workers again
#   --dry-run          print the commands instead of running them
#
# The checkout (git-ignored files left out) is copied to ~/flamingo_jax on
# every worker, and `launch/run_tpu.sh MODULE ARGS...` runs there on all
# workers at once (`--worker=all`); ARGS reach the module exactly as given
# here (each is quoted for the workers' shell).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
# shellcheck source=launch/_lib.sh
source "$HERE/_lib.sh"

usage() { sed -n '2,28s/^# \{0,1\}//p' "$0"; }
NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME=""
CREATE=0
SPOT=0
COPY=1
while (($#)); do
  case "$1" in
    --name|--name=*) NAME="$(option_value "$@")" ;;
    --zone|--zone=*) ZONE="$(option_value "$@")" ;;
    --project|--project=*) PROJECT="$(option_value "$@")" ;;
    --type|--type=*) TYPE="$(option_value "$@")" ;;
    --runtime|--runtime=*) RUNTIME="$(option_value "$@")" ;;
    --create) CREATE=1; shift; continue ;;
    --spot) SPOT=1; shift; continue ;;
    --no-copy) COPY=0; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1; see --help" ;;
    *) break ;;
  esac
  shift "$(option_width "$1")"
done
(($#)) || die "no module to run (e.g. flamingo_jax.train ...); see --help"
[[ -n "$NAME" ]] || die "set --name (or TPU_NAME)"
[[ -n "$ZONE" ]] || die "set --zone (or ZONE)"

where=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || where+=(--project="$PROJECT")

if [[ -n "$TYPE" ]]; then
  shape="$(tpu_chips_and_hosts "$TYPE")"
  read -r chips hosts <<< "$shape"
  note "$TYPE: $chips chips on $hosts workers; --worker=all starts the" \
    "module on all $hosts (one JAX process each)"
fi

if ((CREATE)); then
  [[ -n "$TYPE" ]] || die "--create needs --type (e.g. v4-32)"
  request=(gcloud compute tpus queued-resources create "$NAME"
    --node-id="$NAME" --accelerator-type="$TYPE"
    --runtime-version="${RUNTIME:-$(tpu_runtime_version "$TYPE")}"
    "${where[@]}")
  if ((SPOT)); then request+=(--spot); fi
  run "${request[@]}"
  state=(gcloud compute tpus queued-resources describe "$NAME" "${where[@]}"
    --format='value(state.state)')
  note "wait until the queued resource is ACTIVE:"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "until [[ \"\$($(quote "${state[@]}"))\" == ACTIVE ]]; do" \
      "sleep 30; done"
  else
    until [[ "$("${state[@]}")" == ACTIVE ]]; do
      note "queued resource $NAME: $("${state[@]}"); waiting"
      sleep 30
    done
  fi
fi

if ((COPY)); then
  bundle="${TMPDIR:-/tmp}/flamingo_jax_$NAME.tgz"
  run tar -czf "$bundle" --exclude-vcs --exclude-vcs-ignores \
    -C "$REPO" .
  run gcloud compute tpus tpu-vm scp "$bundle" "$NAME:flamingo_jax.tgz" \
    --worker=all "${where[@]}"
  unpack='mkdir -p ~/flamingo_jax && '
  unpack+='tar -xzf ~/flamingo_jax.tgz -C ~/flamingo_jax && '
else
  unpack=''
fi
remote="${unpack}cd ~/flamingo_jax && bash launch/run_tpu.sh $(quote "$@")"
note "on every worker: $remote"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${where[@]}" \
  --command="$remote"
