# Shared by the launch scripts (source it): dry runs, quoting, options.
#
# With DRY_RUN=1 (`--dry-run`, or FLAMINGO_LAUNCH_DRY_RUN=1 in the
# environment) `run` prints each command as one shell-quoted line instead of
# running it, and `note` prints a `# comment`: the output of a dry run is
# itself a bash script of what would run.

DRY_RUN="${FLAMINGO_LAUNCH_DRY_RUN:-0}"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# "$@" as one string that a shell splits back into exactly these words
# (bash's printf %q: spaces, quotes, $, ~ and the like are escaped).
quote() {
  local line
  printf -v line '%q ' "$@"
  echo "${line% }"
}

note() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# $*"
  else
    echo "$*" >&2
  fi
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

# Like `run` for the last command: the process replaces this script, so it
# receives the scheduler's signals (SIGTERM on preemption) itself.
run_exec() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    exec "$@"
  fi
}

# `option_value "$@"` in an option loop: the value of --NAME=V or --NAME V.
option_value() {
  if [[ "$1" == --*=* ]]; then
    echo "${1#*=}"
  elif [[ $# -ge 2 ]]; then
    echo "$2"
  else
    die "$1 needs a value"
  fi
}

# How many positional words an option took: 1 for --NAME=V, 2 for --NAME V.
option_width() {
  if [[ "$1" == --*=* ]]; then echo 1; else echo 2; fi
}

# Chips and hosts of a Cloud TPU accelerator type, as "CHIPS HOSTS".
# v4-N and v5p-N count TensorCores (2 per chip, one JAX device per chip) on
# hosts of 4 chips; v5litepod-N / v5e-N and v6e-N count chips on hosts of up
# to 8 (cloud.google.com/tpu/docs/v5p, /v5e, /v6e).
tpu_chips_and_hosts() {
  local type="$1" generation count chips per_host
  generation="${type%-*}"
  count="${type##*-}"
  [[ "$count" =~ ^[0-9]+$ ]] || die "accelerator type $type: want e.g. v4-32"
  case "$generation" in
    v4|v5p) chips=$((count / 2)); per_host=4 ;;
    v5litepod|v5e|v6e) chips=$count; per_host=8 ;;
    *) die "unknown TPU generation in $type (v4, v5p, v5litepod, v6e)" ;;
  esac
  ((chips >= 1)) || die "accelerator type $type has no chip"
  echo "$chips $(((chips + per_host - 1) / per_host))"
}

# The TPU software version for JAX (cloud.google.com/tpu/docs/runtimes).
tpu_runtime_version() {
  case "${1%-*}" in
    v4) echo tpu-ubuntu2204-base ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v5litepod|v5e) echo v2-alpha-tpuv5-lite ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for $1; pass --runtime" ;;
  esac
}
