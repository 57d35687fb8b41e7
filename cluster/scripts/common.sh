# Shared settings for the local-cluster scripts (sourced by up.sh, down.sh, status.sh, submit.sh).
#
# Everything is overridable from the environment (the Makefile passes its variables through):
#   CLUSTER_DIR           state folder: pids, logs of `ray start`, token, cluster.env   (.cluster)
#   CLUSTER_PORT          GCS port of the head; the other fixed ports follow it         (23800)
#                           +1 dashboard / job server (127.0.0.1 only), +2 Ray Client server,
#                           +3 head dashboard agent, +4 worker-node dashboard agent
#   CLUSTER_TMP           Ray --temp-dir root: head/ and worker/ below it                (/tmp/catdog-ray-$CLUSTER_PORT)
#   CLUSTER_HEAD_CPUS     logical CPUs of the head node                                 (2)
#   CLUSTER_WORKER_CPUS   logical CPUs of the extra worker node                         (3)
#   CLUSTER_OBJECT_STORE_MB  object store per node, MiB                                 (2048)
#   CLUSTER_VENV_BIN      bin/ of the Python environment with ray and catdog            (<repo>/.venv/bin)
#   CLUSTER_WORKER_ENV    VAR=value words set on the worker node only (tests: a node without weights) (unset)
# Token authentication is always on: the token lives in $CLUSTER_DIR/auth_token (mode 600) and
# every Ray process and client here reads it through RAY_AUTH_TOKEN_PATH.

set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPTS/../.." && pwd)"
CLUSTER_DIR="$(realpath -m "${CLUSTER_DIR:-$REPO/.cluster}")"
CLUSTER_PORT="${CLUSTER_PORT:-23800}"
CLUSTER_TMP="$(realpath -m "${CLUSTER_TMP:-/tmp/catdog-ray-$CLUSTER_PORT}")"
CLUSTER_HEAD_CPUS="${CLUSTER_HEAD_CPUS:-2}"
CLUSTER_WORKER_CPUS="${CLUSTER_WORKER_CPUS:-3}"
CLUSTER_OBJECT_STORE_MB="${CLUSTER_OBJECT_STORE_MB:-2048}"
CLUSTER_VENV_BIN="$(realpath -m "${CLUSTER_VENV_BIN:-$REPO/.venv/bin}")"

RAY="$CLUSTER_VENV_BIN/ray"
PY="$CLUSTER_VENV_BIN/python"
STATE_FILE="$CLUSTER_DIR/cluster.env"
TOKEN_FILE="$CLUSTER_DIR/auth_token"

GCS_PORT="$CLUSTER_PORT"
DASHBOARD_PORT=$((CLUSTER_PORT + 1))
CLIENT_PORT=$((CLUSTER_PORT + 2))
HEAD_AGENT_PORT=$((CLUSTER_PORT + 3))
WORKER_AGENT_PORT=$((CLUSTER_PORT + 4))
CLUSTER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
GCS_ADDRESS="127.0.0.1:$GCS_PORT"

die() {
  echo "catdog cluster: $*" >&2
  exit 1
}

# Ray processes and clients started from these scripts talk to this cluster only, with its token.
use_cluster_auth() {
  unset RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_TOKEN
  export RAY_AUTH_MODE=token
  export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
}

# The state file written by up.sh: the cluster's addresses, temp dir and token path.
load_state() {
  [[ -f "$STATE_FILE" ]] || die "no cluster recorded in $CLUSTER_DIR; start one with 'make cluster-up'"
  # shellcheck disable=SC1090
  source "$STATE_FILE"
}

# True when $1 is a live process whose command line mentions $2 (guards against pid reuse).
pid_is_ours() {
  local pid="$1" marker="$2"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker"
}

# Pids of every process whose command line mentions the cluster's temp dir (raylets, GCS, workers...).
pids_under_tmp() {
  local marker="$1" pid
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [[ "$pid" == "$$" ]] && continue
    if [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"; then
      echo "$pid"
    fi
  done
}
