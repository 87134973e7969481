#!/usr/bin/env bash
# Launches omnitrain_jax on GPUs: one or more nodes, via SLURM or by hand.
#
# SLURM (inside salloc/sbatch, or srun allocates): one JAX process per GPU.
# srun sets SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
# SLURM_LOCALID, from which jax.distributed.initialize() (called by main) finds
# the coordinator (first node), the process count and id, and gives each
# process the GPU numbered SLURM_LOCALID.
#   launch/gpu.sh --nodes=2 --gpus_per_node=8 --partition=gpu \
#     --config=configs/omnidet_b16.py --workdir=/shared/runs/b16
#
# Explicit coordinator (no SLURM): run once on every node, one process per
# node using all of its GPUs; process 0's host is the coordinator.
#   launch/gpu.sh --coordinator_address=10.0.0.1:12345 --num_processes=2 \
#     --process_id=0 --config=configs/omnidet_b16.py --workdir=/shared/runs/b16
#
# Add --dry_run to print the commands instead of running them.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR

usage() {
  cat <<'EOF'
Usage (SLURM):    launch/gpu.sh --nodes=N --gpus_per_node=G
                    --config=PATH[:variant] --workdir=DIR
                    [--partition=P] [--time=HH:MM:SS] [--account=A]
                    [--install] [--python=python3] [--dry_run] [-- MAIN_FLAGS...]
Usage (explicit): launch/gpu.sh --coordinator_address=HOST:PORT
                    --num_processes=N --process_id=I
                    --config=PATH[:variant] --workdir=DIR
                    [--install] [--python=python3] [--dry_run] [-- MAIN_FLAGS...]

Required:
  --config               Config file, optional :variant (e.g. ...py:tiny).
  --workdir              Run directory on storage all nodes share.
SLURM mode (default):
  --nodes                Number of nodes.
  --gpus_per_node        GPUs per node; one JAX process per GPU.
  --partition, --time, --account   Passed to srun.
Explicit mode (when --coordinator_address is given):
  --coordinator_address  HOST:PORT of process 0, reachable from every node.
  --num_processes        Total processes (nodes).
  --process_id           This node's process id, 0..N-1.
Other:
  --install              First run `pip install -e .[gpu]` (shared filesystem:
                         once, on this node).
  --python               Python interpreter (default python3).
  --dry_run              Print the commands, run nothing.
  -h, --help             Show this help.
Everything after `--` is passed to omnitrain_jax.main, e.g. --config.seed=1.
EOF
}

die() {
  echo "ERROR: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

# Prints one argument so that a POSIX shell reads it back unchanged.
quote() {
  local s="$1"
  if [[ -n "${s}" && "${s}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "${arg}")"
  done
  printf '%s' "${out}"
}

DRY_RUN=0
run() {
  if (( DRY_RUN )); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

CONFIG="" WORKDIR="" NODES="" GPUS_PER_NODE="" PARTITION="" TIME="" ACCOUNT=""
COORDINATOR="" NUM_PROCESSES="" PROCESS_ID="" INSTALL=0 PYTHON="python3"
REPO="$(cd "${SCRIPT_DIR}/.." && pwd)"
MAIN_ARGS=()

while (( $# )); do
  arg="$1"
  shift
  case "${arg}" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1; continue ;;
    --install) INSTALL=1; continue ;;
    --) MAIN_ARGS=("$@"); break ;;
    --*=*) flag="${arg%%=*}"; value="${arg#*=}" ;;
    --*)
      flag="${arg}"
      (( $# )) || die "${flag} needs a value."
      value="$1"
      shift
      ;;
    *) die "Unexpected argument '${arg}' (flags go before --, main's after)." ;;
  esac
  case "${flag}" in
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --nodes) NODES="${value}" ;;
    --gpus_per_node) GPUS_PER_NODE="${value}" ;;
    --partition) PARTITION="${value}" ;;
    --time) TIME="${value}" ;;
    --account) ACCOUNT="${value}" ;;
    --coordinator_address) COORDINATOR="${value}" ;;
    --num_processes) NUM_PROCESSES="${value}" ;;
    --process_id) PROCESS_ID="${value}" ;;
    --python) PYTHON="${value}" ;;
    *) die "Unknown flag ${flag}." ;;
  esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

missing=()
[[ -n "${CONFIG}" ]] || missing+=(--config)
[[ -n "${WORKDIR}" ]] || missing+=(--workdir)
if [[ -n "${COORDINATOR}" ]]; then
  [[ -n "${NUM_PROCESSES}" ]] || missing+=(--num_processes)
  [[ -n "${PROCESS_ID}" ]] || missing+=(--process_id)
else
  [[ -n "${NODES}" ]] || missing+=(--nodes)
  [[ -n "${GPUS_PER_NODE}" ]] || missing+=(--gpus_per_node)
fi
(( ${#missing[@]} == 0 )) || die "Missing required flag(s): ${missing[*]}."

main=("${PYTHON}" -m omnitrain_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}")
if [[ -n "${COORDINATOR}" ]]; then
  [[ "${COORDINATOR}" =~ ^[^:]+:[0-9]+$ ]] \
    || die "--coordinator_address=${COORDINATOR} must be HOST:PORT."
  is_int "${NUM_PROCESSES}" && (( NUM_PROCESSES >= 1 )) \
    || die "--num_processes=${NUM_PROCESSES} must be a positive integer."
  is_int "${PROCESS_ID}" && (( PROCESS_ID < NUM_PROCESSES )) \
    || die "--process_id=${PROCESS_ID} must be in 0..$(( NUM_PROCESSES - 1 ))."
  main+=("--coordinator_address=${COORDINATOR}"
         "--num_processes=${NUM_PROCESSES}" "--process_id=${PROCESS_ID}")
else
  is_int "${NODES}" && (( NODES >= 1 )) \
    || die "--nodes=${NODES} must be a positive integer."
  is_int "${GPUS_PER_NODE}" && (( GPUS_PER_NODE >= 1 )) \
    || die "--gpus_per_node=${GPUS_PER_NODE} must be a positive integer."
fi
main+=(${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})

if (( INSTALL )); then
  run "${PYTHON}" -m pip install -q -e "${REPO}[gpu]"
fi

if [[ -n "${COORDINATOR}" ]]; then
  run "${main[@]}"
else
  srun=(srun --nodes="${NODES}" --ntasks-per-node="${GPUS_PER_NODE}"
        --gpus-per-node="${GPUS_PER_NODE}" --kill-on-bad-exit=1)
  [[ -z "${PARTITION}" ]] || srun+=(--partition="${PARTITION}")
  [[ -z "${TIME}" ]] || srun+=(--time="${TIME}")
  [[ -z "${ACCOUNT}" ]] || srun+=(--account="${ACCOUNT}")
  run "${srun[@]}" "${main[@]}"
fi
