#!/usr/bin/env bash
# Runs a flamingo_jax module on every worker of a Cloud TPU VM (or pod slice).
#
#   bash launch/run_tpu.sh flamingo_jax.train --config experiments/tiny.py \
#       --workdir gs://BUCKET/runs/tiny
#
# Creates (or reuses) a virtualenv in ~/flamingo_venv, installs jax[tpu] and
# this package, then runs `python -m "$@"` with FLAMINGO_JAX_DISTRIBUTED=1 so
# that every process joins jax.distributed before anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FLAMINGO_VENV:-$HOME/flamingo_venv}"
if [[ ! -d "$VENV" ]]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "jax[tpu]>=0.10.2" \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python -m pip install -q -e .
export FLAMINGO_JAX_DISTRIBUTED=1
exec python -m "$@"
