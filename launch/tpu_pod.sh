#!/usr/bin/env bash
# Copies this checkout to every worker of a TPU VM pod slice and starts a run.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh \
#       flamingo_jax.train --config experiments/flamingo.py:3B \
#       --workdir gs://BUCKET/runs/3b
#
# Needs gcloud, a TPU VM created with a JAX-capable runtime, and a GCS bucket
# for the workdir and the prepared datasets (see launch/README.md).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  . "$TPU_NAME":~/flamingo_jax
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd ~/flamingo_jax && bash launch/run_tpu.sh $*"
