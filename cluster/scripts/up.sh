#!/usr/bin/env bash
# Start a real two-node Ray cluster on this machine: a head node plus one extra worker node, each a
# `ray start --block` process in its own session, so `make cluster-down` can stop exactly these two.
# Dashboard and job server listen on 127.0.0.1 only; token authentication is on.
# Settings: see common.sh.  Prints the dashboard address and where the token is.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ -x "$RAY" ]] || die "$RAY not found; run 'make install' (or set CLUSTER_VENV_BIN)"

if [[ -f "$STATE_FILE" ]]; then
  # A subshell: the recorded cluster's settings must not replace this run's.
  if (source "$STATE_FILE" && pid_is_ours "${HEAD_PID:-}" "$CLUSTER_TMP/head" &&
    echo "catdog cluster: already running (dashboard $CLUSTER_ADDRESS); 'make cluster-down' stops it"); then
    exit 0
  fi
  echo "catdog cluster: removing the state of a cluster that is gone"
  bash "$SCRIPTS/down.sh" >/dev/null 2>&1 || true
fi

# Fail with a clear line instead of a Ray traceback when a fixed port is taken.
"$PY" - "$GCS_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$HEAD_AGENT_PORT" "$WORKER_AGENT_PORT" <<'EOF' ||
import socket, sys
busy = []
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            busy.append(port)
if busy:
    sys.exit(f"ports {busy} are in use")
EOF
  die "pick a free range with CLUSTER_PORT=<port> (it uses CLUSTER_PORT..CLUSTER_PORT+4)"

mkdir -p "$CLUSTER_DIR" "$CLUSTER_TMP/head" "$CLUSTER_TMP/worker"
chmod 700 "$CLUSTER_DIR"
if [[ ! -s "$TOKEN_FILE" ]]; then
  # Same kind of token `ray get-auth-token --generate` makes (256 random bits), in our own file.
  (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_FILE")
fi
chmod 600 "$TOKEN_FILE"

use_cluster_auth
# Every process of the cluster names its own GCS.  Without it, code that looks the cluster up (Ray Train's
# PlacementGroupCleaner does) fails with "Found multiple active Ray instances" when another Ray runs here.
export RAY_ADDRESS="$GCS_ADDRESS"
# Jobs run `python ...`: make that the environment with ray and catdog, whatever PATH make had.
export PATH="$CLUSTER_VENV_BIN:$PATH"
# On SIGTERM a `ray start --block` node drains first; a local cluster has nothing to hand over.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-2}"
export RAY_USAGE_STATS_ENABLED=0

OBJECT_STORE_BYTES=$((CLUSTER_OBJECT_STORE_MB * 1024 * 1024))
COMMON=(--block --node-ip-address 127.0.0.1 --num-gpus 0 --object-store-memory "$OBJECT_STORE_BYTES"
  --disable-usage-stats --log-style record)

# setsid: the nodes outlive this shell and a Ctrl-C in the terminal that ran make.
setsid "$RAY" start --head "${COMMON[@]}" --temp-dir "$CLUSTER_TMP/head" \
  --port "$GCS_PORT" --num-cpus "$CLUSTER_HEAD_CPUS" \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$HEAD_AGENT_PORT" \
  >"$CLUSTER_DIR/head.log" 2>&1 </dev/null &
HEAD_PID=$!
echo "$HEAD_PID" >"$CLUSTER_DIR/head.pid"

# Values shell-quoted (printf %q): load_state sources this file, and paths may hold spaces.
printf '%s=%q\n' CLUSTER_ADDRESS "$CLUSTER_ADDRESS" GCS_ADDRESS "$GCS_ADDRESS" CLUSTER_TMP "$CLUSTER_TMP" \
  TOKEN_FILE "$TOKEN_FILE" HEAD_PID "$HEAD_PID" >"$STATE_FILE"

# True once the job server answers an authenticated request and reports $1 live nodes.
cluster_ready() {
  "$PY" - "$CLUSTER_ADDRESS" "$TOKEN_FILE" "$1" <<'PYEOF' 2>/dev/null
import json, sys, urllib.request
address, token_file, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
headers = {"Authorization": "Bearer " + open(token_file).read().strip()}
def get(path):
    with urllib.request.urlopen(urllib.request.Request(address + path, headers=headers), timeout=5) as r:
        return json.load(r)
get("/api/jobs/")
nodes = get("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]
sys.exit(0 if sum(n.get("state") == "ALIVE" for n in nodes) >= want else 1)
PYEOF
}

wait_ready() {
  local nodes="$1" pid_file timeout=${CLUSTER_START_TIMEOUT:-120} start=$SECONDS
  while ! cluster_ready "$nodes"; do
    for pid_file in "$CLUSTER_DIR"/*.pid; do
      if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        echo "catdog cluster: the $(basename "$pid_file" .pid) node exited while starting; end of its log:" >&2
        tail -n 30 "${pid_file%.pid}.log" >&2
        bash "$SCRIPTS/down.sh" >/dev/null 2>&1 || true
        exit 1
      fi
    done
    if ((SECONDS - start > timeout)); then
      echo "catdog cluster: not ready after ${timeout}s; see $CLUSTER_DIR/*.log and $CLUSTER_TMP/*/session_latest/logs" >&2
      bash "$SCRIPTS/down.sh" >/dev/null 2>&1 || true
      exit 1
    fi
    sleep 1
  done
}

wait_ready 1

# CLUSTER_WORKER_ENV (VAR=value words) sets the worker node's environment apart from the head's,
# e.g. a TORCH_HOME without the ImageNet weights, as on a node that never got them.
# shellcheck disable=SC2086
setsid env ${CLUSTER_WORKER_ENV:-} "$RAY" start "${COMMON[@]}" --temp-dir "$CLUSTER_TMP/worker" \
  --address "$GCS_ADDRESS" --num-cpus "$CLUSTER_WORKER_CPUS" --dashboard-agent-listen-port "$WORKER_AGENT_PORT" \
  >"$CLUSTER_DIR/worker.log" 2>&1 </dev/null &
WORKER_PID=$!
echo "$WORKER_PID" >"$CLUSTER_DIR/worker.pid"
printf 'WORKER_PID=%q\n' "$WORKER_PID" >>"$STATE_FILE"

wait_ready 2

# For a shell that wants the plain ray CLI:  source .cluster/env.sh && ray job list
printf 'export %s=%q\n' RAY_AUTH_MODE token RAY_AUTH_TOKEN_PATH "$TOKEN_FILE" \
  RAY_API_SERVER_ADDRESS "$CLUSTER_ADDRESS" RAY_ADDRESS "$GCS_ADDRESS" >"$CLUSTER_DIR/env.sh"

TOTAL_CPUS=$((CLUSTER_HEAD_CPUS + CLUSTER_WORKER_CPUS))
cat <<EOF
catdog cluster: up, 2 nodes (head ${CLUSTER_HEAD_CPUS} CPUs + worker ${CLUSTER_WORKER_CPUS} CPUs = ${TOTAL_CPUS} logical CPUs)
  dashboard / job server: $CLUSTER_ADDRESS   (127.0.0.1 only; the browser asks for the token)
  GCS address:            $GCS_ADDRESS
  auth token:             $TOKEN_FILE   (mode 600; 'cat' it to paste into the dashboard)
  ray CLI in a shell:     source $(printf %q "$CLUSTER_DIR/env.sh") && ray job list
  submit:                 make submit-train | submit-predict | submit-run  [CONFIG=...]
  stop:                   make cluster-down
EOF
