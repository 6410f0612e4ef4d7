#!/usr/bin/env bash
# One-shot GPU benchmark of flamingo_jax: installs what is missing, runs the
# benchmarks in order of importance within a time budget, writes one JSON per
# run (and all.json with every result) and prints a summary table last.
#
#   bash launch/bench_gpu.sh                  # from the repository root
#   OUT=/tmp/results bash launch/bench_gpu.sh
#   bash launch/bench_gpu.sh --no-install     # never pip (deps preinstalled,
#                                             # the repo on PYTHONPATH)
#   bash launch/bench_gpu.sh --dry-run        # print the plan, run nothing
#
# Runs (each under `timeout`, each tolerant of the others' failure):
#   1. smoke       tiny config, a few steps: does the stack work (seconds)
#   2. train_3b_remat_none   3B train step, M3W shapes: 8 x 256 tokens + 5
#                  images at 320 px, bf16 compute, remat off in both stacks
#                  (LM and cross-attention; the MFU figure)
#   3. generate_3b 3B cached vs uncached greedy decoding, 64 new tokens
#   4. train_3b_remat_dots, 5. train_3b_remat_full: the remat sweep (the LM's
#                  and the cross-attention's policy set alike), fewer timed
#                  steps
# If the smoke run fails, the 3B runs are skipped (they would fail the same
# way). A run is skipped when the budget (BENCH_BUDGET_S, default 330 s from
# the first run) has less than 45 s left; each gets at most what is left.
#
# Environment (all optional):
#   OUT                    results directory (default ./bench_out)
#   FLAMINGO_BENCH_INSTALL 0 = never pip install (same as --no-install)
#   JAX_CUDA               jax extra to install if jax sees no GPU:
#                          cuda13 (default) or cuda12
#   PYTHON                 interpreter (default python, else python3)
#   BENCH_BUDGET_S         seconds for all runs (default 330)
#   BENCH_CONFIG           default experiments/flamingo.py:3B
#   BENCH_BATCH, BENCH_SEQ, BENCH_IMAGES, BENCH_IMAGE_SIZE
#                          train shapes (default 8, 256, 5, 320)
#   BENCH_EXTRA_FLAGS      appended to every 3B run, e.g.
#                          '--config.optim.microbatches=2 --mesh data:-1'
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO="$(pwd)"

DRY_RUN=0
INSTALL="${FLAMINGO_BENCH_INSTALL:-1}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
OUT="${OUT:-$REPO/bench_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
CONFIG="${BENCH_CONFIG:-experiments/flamingo.py:3B}"
BATCH="${BENCH_BATCH:-8}"
SEQ="${BENCH_SEQ:-256}"
IMAGES="${BENCH_IMAGES:-5}"
IMAGE_SIZE="${BENCH_IMAGE_SIZE:-320}"
BUDGET_S="${BENCH_BUDGET_S:-330}"
read -r -a EXTRA <<< "${BENCH_EXTRA_FLAGS:-}"
MIN_RUN_S=45  # Less than this left: skip the run (a 3B compile takes ~1 min).

# The repository is importable whether or not it is pip-installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Let the 3B step use most of the GPU (jax preallocates 75% by default), and
# reuse compilations when the script is run again on the same machine.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/flamingo_jax_bench_cache}"

gpu_visible() {
  "$PYTHON" -c 'import sys, jax
sys.exit(0 if any(d.platform == "gpu" for d in jax.devices()) else 1)' \
    > /dev/null 2>&1
}

package_imports() {
  "$PYTHON" -c 'import haiku, optax, chex, einops, ml_collections
import orbax.checkpoint, sentencepiece
import flamingo_jax.bench, flamingo_jax.training.loop' > /dev/null 2>&1
}

install() {
  if gpu_visible; then
    echo "jax sees a GPU: not installing jax."
  else
    echo "jax sees no GPU: pip install -U jax[${JAX_CUDA:-cuda13}]"
    "$PYTHON" -m pip install -q -U "jax[${JAX_CUDA:-cuda13}]" || true
  fi
  if package_imports; then
    echo "flamingo_jax and its dependencies import: not installing."
  else
    echo "pip install -e $REPO"
    "$PYTHON" -m pip install -q -e "$REPO" || true
  fi
}

START=$SECONDS
STATUS="$OUT/status.tsv"
: > "$STATUS"

# run NAME MAX_SECONDS COMMAND...: one benchmark, logged to $OUT/NAME.log.
run() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  ((left < 0)) && left=0
  local limit=$((max < left ? max : left))
  echo
  echo "== $name (timeout ${limit}s): $*"
  if ((DRY_RUN)); then
    return 0
  fi
  if ((left < MIN_RUN_S)); then
    echo "   skipped: ${left}s of the ${BUDGET_S}s budget left."
    printf '%s\tskipped\t0\n' "$name" >> "$STATUS"
    return 0
  fi
  local begin=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/$name.log"
  ((rc == 124 || rc == 137)) && echo "   timed out after ${limit}s."
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" >> "$STATUS"
}

BENCH=("$PYTHON" -m flamingo_jax.bench)

if ((DRY_RUN)); then
  echo "dry run: results would go to $OUT; install: $INSTALL"
elif ((INSTALL)); then
  install
fi
if ((!DRY_RUN)); then
  command -v nvidia-smi > /dev/null && nvidia-smi -L
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())' \
    || echo "jax does not import: the runs below will fail."
fi
START=$SECONDS

SHAPES=(--datasets m3w --batch "$BATCH" --seq "$SEQ" --images "$IMAGES"
        --image_size "$IMAGE_SIZE" --config.compute_dtype=bfloat16)
run smoke 90 "${BENCH[@]}" train --config experiments/tiny.py:smoke \
  --datasets pairs --batch 8 --seq 32 --warmup 1 --steps 5 \
  --json "$OUT/smoke.json"
if ((!DRY_RUN)) && [[ "$(tail -n 1 "$STATUS" | cut -f2)" != 0 ]]; then
  # The 3B runs would fail the same way: keep the machine's time.
  echo "   the smoke run failed: skipping the 3B runs (see $OUT/smoke.log)."
  BUDGET_S=0
fi
run train_3b_remat_none 200 "${BENCH[@]}" train --config "$CONFIG" \
  "${SHAPES[@]}" --config.model.lm.remat_policy=none \
  --config.model.xattn.remat_policy=none --warmup 2 --steps 20 \
  --json "$OUT/train_3b_remat_none.json" ${EXTRA[@]+"${EXTRA[@]}"}
run generate_3b 200 "${BENCH[@]}" generate --config "$CONFIG" \
  --batch "$BATCH" --prompt_len "$SEQ" --images "$IMAGES" --new_tokens 64 \
  --repeats 1 --json "$OUT/generate_3b.json" ${EXTRA[@]+"${EXTRA[@]}"}
for policy in dots full; do
  run "train_3b_remat_$policy" 150 "${BENCH[@]}" train --config "$CONFIG" \
    "${SHAPES[@]}" "--config.model.lm.remat_policy=$policy" \
    "--config.model.xattn.remat_policy=$policy" --warmup 1 \
    --steps 8 --json "$OUT/train_3b_remat_$policy.json" \
    ${EXTRA[@]+"${EXTRA[@]}"}
done

((DRY_RUN)) && exit 0
echo
echo "== summary (${OUT}; $((SECONDS - START))s of runs)"
"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
status = {}
for line in open(os.path.join(out, 'status.tsv')):
  name, rc, seconds = line.rstrip('\n').split('\t')
  status[name] = (rc, seconds)
results = {}
def fmt(value, scale=1.0, digits=1, suffix=''):
  if value is None:
    return '-'
  return f'{value * scale:.{digits}f}{suffix}'
print(f'{"run":22s} {"status":8s} {"remat":>10s} {"step ms":>8s} {"tokens/s":>9s} '
      f'{"TFLOP/st":>8s} {"TFLOP/s":>8s} {"MFU":>6s} {"peak GiB":>8s} '
      f'{"compile s":>9s}')
for name, (rc, seconds) in status.items():
  path = os.path.join(out, f'{name}.json')
  figures = json.load(open(path)) if os.path.exists(path) else None
  results[name] = figures or {'status': rc}
  state = 'ok' if rc == '0' else ('timeout' if rc in ('124', '137') else
                                  'skipped' if rc == 'skipped' else f'rc {rc}')
  if not figures:
    print(f'{name:22s} {state:8s}')
  elif figures['command'] == 'train':
    remat = (f'{figures.get("remat_policy")}/'
             f'{figures.get("xattn_remat_policy")}')
    print(f'{name:22s} {state:8s} {remat:>10s} {fmt(figures["step_s"], 1e3):>8s} '
          f'{fmt(figures["tokens_per_s"], digits=0):>9s} '
          f'{fmt(figures["model_tflop_per_step"], digits=2):>8s} '
          f'{fmt(figures["achieved_tflop_per_s"]):>8s} '
          f'{fmt(figures["mfu"], 100, 1, "%"):>6s} '
          f'{fmt(figures["peak_bytes_in_use"], 2**-30):>8s} '
          f'{fmt(figures["compile_s"]):>9s}')
  else:
    print(f'{name:22s} {state:8s} cached {figures["cached_tokens_per_s"]:.0f} '
          f'tokens/s, uncached {figures["uncached_tokens_per_s"]:.0f} '
          f'tokens/s: {figures["speedup"]:.1f}x at {figures["new_tokens"]} '
          f'new tokens (same tokens: {figures["same_tokens"]})')
with open(os.path.join(out, 'all.json'), 'w') as f:
  json.dump(results, f, indent=2, sort_keys=True)
print(f'all results: {os.path.join(out, "all.json")}')
EOF
