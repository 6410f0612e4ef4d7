#!/usr/bin/env bash
# Runs a flamingo_jax module on this TPU VM worker (tpu_pod.sh and xpk.sh
# start it on every worker of a slice).
#
#   bash launch/run_tpu.sh [--dry-run] flamingo_jax.train \
#       --config experiments/tiny.py --workdir gs://BUCKET/runs/tiny
#
# Creates (or reuses) a virtualenv in $FLAMINGO_VENV (~/flamingo_venv),
# installs jax[tpu] and this package, then runs `python -m "$@"` with
# FLAMINGO_JAX_DISTRIBUTED=1, so that every process calls
# jax.distributed.initialize() first (it finds the other workers by itself
# on Cloud TPU VMs and on GKE).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/_lib.sh
source "$HERE/_lib.sh"

usage() { sed -n '2,11s/^# \{0,1\}//p' "$0"; }
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
(($#)) || die "no module to run (e.g. flamingo_jax.train ...); see --help"

cd "$HERE/.."
VENV="${FLAMINGO_VENV:-$HOME/flamingo_venv}"
if [[ ! -d "$VENV" ]]; then
  run python3 -m venv "$VENV"
fi
PYTHON="$VENV/bin/python"
run "$PYTHON" -m pip install -q --upgrade pip
run "$PYTHON" -m pip install -q "jax[tpu]>=0.10.2" \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
run "$PYTHON" -m pip install -q -e .
run_exec env FLAMINGO_JAX_DISTRIBUTED=1 "$PYTHON" -m "$@"
