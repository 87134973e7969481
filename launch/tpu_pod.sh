#!/usr/bin/env bash
# Launches omnitrain_jax on a Cloud TPU VM (single host or pod slice).
#
# Creates the TPU VM, copies the committed repository (git archive HEAD) to every
# worker, installs it with `pip install -e .[tpu]`, and runs
# `python3 -m omnitrain_jax.main` on all workers at once; main calls
# jax.distributed.initialize(), which finds the other workers by itself on TPU.
#
# Example:
#   launch/tpu_pod.sh --name=omni-b16 --zone=us-central2-b \
#     --accelerator_type=v4-32 --version=tpu-ubuntu2204-base \
#     --config=configs/omnidet_b16.py --workdir=gs://my-bucket/runs/b16 \
#     -- --config.total_steps=20000
#
# Add --dry_run to print every command instead of running it.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator_type=TYPE
         --version=RUNTIME --config=PATH[:variant] --workdir=gs://BUCKET/DIR
         [--project=PROJECT] [--spot] [--skip_create] [--skip_install]
         [--detach] [--python=python3] [--remote_dir=omnitrain_jax]
         [--repo=PATH] [--dry_run] [-- MAIN_FLAGS...]

Required:
  --name              TPU VM name.
  --zone              Zone, e.g. us-central2-b.
  --accelerator_type  e.g. v4-8, v4-32, v5litepod-16.
  --version           TPU VM runtime, e.g. tpu-ubuntu2204-base
                      (not needed with --skip_create).
  --config            Config file relative to the repo root, with an optional
                      :variant, e.g. configs/omnidet_b16.py:tiny.
  --workdir           Run directory every worker can reach (gs://...).
Optional:
  --project           gcloud project (default: gcloud's configured one).
  --spot              Create a Spot TPU VM (preemptible; runs resume from the
                      latest checkpoint in --workdir).
  --skip_create       Use an existing TPU VM.
  --skip_install      Do not copy and install the repository.
  --detach            Run main in the background on the workers (nohup,
                      log in ~/omnitrain_main.log) instead of streaming output.
  --python            Python on the workers (default python3).
  --remote_dir        Install directory on the workers, relative to $HOME
                      (default omnitrain_jax).
  --repo              Local repository to copy (default: this script's repo).
  --dry_run           Print the commands, run nothing.
  -h, --help          Show this help.
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

# Prints a command line, each argument quoted.
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

NAME="" ZONE="" ACCELERATOR_TYPE="" VERSION="" CONFIG="" WORKDIR=""
PROJECT="" SPOT=0 SKIP_CREATE=0 SKIP_INSTALL=0 DETACH=0 PYTHON="python3"
REMOTE_DIR="omnitrain_jax" REPO="$(cd "${SCRIPT_DIR}/.." && pwd)"
MAIN_ARGS=()

# Accepts --flag=value and --flag value.
while (( $# )); do
  arg="$1"
  shift
  case "${arg}" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1; continue ;;
    --spot) SPOT=1; continue ;;
    --skip_create) SKIP_CREATE=1; continue ;;
    --skip_install) SKIP_INSTALL=1; continue ;;
    --detach) DETACH=1; continue ;;
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
    --name) NAME="${value}" ;;
    --zone) ZONE="${value}" ;;
    --accelerator_type) ACCELERATOR_TYPE="${value}" ;;
    --version) VERSION="${value}" ;;
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --project) PROJECT="${value}" ;;
    --python) PYTHON="${value}" ;;
    --remote_dir) REMOTE_DIR="${value}" ;;
    --repo) REPO="${value}" ;;
    *) die "Unknown flag ${flag}." ;;
  esac
done

missing=()
[[ -n "${NAME}" ]] || missing+=(--name)
[[ -n "${ZONE}" ]] || missing+=(--zone)
[[ -n "${CONFIG}" ]] || missing+=(--config)
[[ -n "${WORKDIR}" ]] || missing+=(--workdir)
if (( ! SKIP_CREATE )); then
  [[ -n "${ACCELERATOR_TYPE}" ]] || missing+=(--accelerator_type)
  [[ -n "${VERSION}" ]] || missing+=(--version)
fi
(( ${#missing[@]} == 0 )) || die "Missing required flag(s): ${missing[*]}."
# The install step runs `rm -rf REMOTE_DIR` on the workers.
if [[ ! "${REMOTE_DIR}" =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ || "/${REMOTE_DIR}/" == */../* ]]; then
  die "--remote_dir=${REMOTE_DIR} must be a relative path below \$HOME without '..'."
fi

if [[ "${WORKDIR}" != gs://* ]]; then
  echo "WARNING: --workdir=${WORKDIR} is not gs://; on a multi-host slice every" \
    "worker must see the same checkpoints." >&2
fi
if [[ ! -f "${REPO}/${CONFIG%%:*}" ]]; then
  echo "WARNING: ${CONFIG%%:*} not found in ${REPO}." >&2
fi

GCLOUD_COMMON=(--zone="${ZONE}")
[[ -z "${PROJECT}" ]] || GCLOUD_COMMON+=(--project="${PROJECT}")

# 1. Create the TPU VM.
if (( ! SKIP_CREATE )); then
  create=(gcloud compute tpus tpu-vm create "${NAME}" "${GCLOUD_COMMON[@]}"
          --accelerator-type="${ACCELERATOR_TYPE}" --version="${VERSION}")
  (( ! SPOT )) || create+=(--spot)
  run "${create[@]}"
fi

# 2. Copy the committed code to every worker and install it.
if (( ! SKIP_INSTALL )); then
  if [[ -n "$(git -C "${REPO}" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    echo "WARNING: ${REPO} has uncommitted changes; only HEAD is copied." >&2
  fi
  archive="${TMPDIR:-/tmp}/omnitrain_jax-${NAME}.tar.gz"
  remote_archive="omnitrain_jax-src.tar.gz"
  run git -C "${REPO}" archive --format=tar.gz --output="${archive}" HEAD
  run gcloud compute tpus tpu-vm scp "${archive}" "${NAME}:${remote_archive}" \
    --worker=all "${GCLOUD_COMMON[@]}"
  install_cmd="rm -rf $(quote "${REMOTE_DIR}") && mkdir -p $(quote "${REMOTE_DIR}")"
  install_cmd+=" && tar -xzf $(quote "${remote_archive}") -C $(quote "${REMOTE_DIR}")"
  install_cmd+=" && cd $(quote "${REMOTE_DIR}")"
  install_cmd+=" && $(quote "${PYTHON}") -m pip install -q -e '.[tpu]'"
  run gcloud compute tpus tpu-vm ssh "${NAME}" --worker=all "${GCLOUD_COMMON[@]}" \
    --command "${install_cmd}"
fi

# 3. Run main on all workers at once (each is one JAX process).
main_cmd="$(quote_all "${PYTHON}" -m omnitrain_jax.main "--config=${CONFIG}" \
  "--workdir=${WORKDIR}" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"
if (( DETACH )); then
  main_cmd="nohup ${main_cmd} > ~/omnitrain_main.log 2>&1 < /dev/null &"
fi
run gcloud compute tpus tpu-vm ssh "${NAME}" --worker=all "${GCLOUD_COMMON[@]}" \
  --command "cd $(quote "${REMOTE_DIR}") && ${main_cmd}"
