#!/usr/bin/env bash
# Stop the cluster that up.sh started, and nothing else: SIGTERM to the two recorded `ray start --block`
# processes (each stops its own node's Ray processes), then SIGKILL to any process still running from
# this cluster's temp dir.  Never `ray stop`, which would kill every Ray on the machine.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -f "$STATE_FILE" ]]; then
  source "$STATE_FILE"
elif [[ ! -f "$CLUSTER_DIR/head.pid" ]]; then
  echo "catdog cluster: nothing to stop (no state in $CLUSTER_DIR)"
  exit 0
fi

stopped=()
for node in worker head; do
  pid_file="$CLUSTER_DIR/$node.pid"
  [[ -f "$pid_file" ]] || continue
  pid="$(cat "$pid_file")"
  if pid_is_ours "$pid" "$CLUSTER_TMP/$node"; then
    kill -TERM "$pid" 2>/dev/null || true
    stopped+=("$pid")
  fi
done

# Each node drains (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) and then terminates its processes.
deadline=$((SECONDS + ${CLUSTER_STOP_TIMEOUT:-30}))
for pid in "${stopped[@]}"; do
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.5
  done
done

# Whatever is left of this cluster (a node killed -9 earlier, a stuck worker): its command line names
# our temp dir, which no other Ray uses.
leftover=()
for node in head worker; do
  while read -r pid; do
    [[ -n "$pid" ]] && leftover+=("$pid")
  done < <(pids_under_tmp "$CLUSTER_TMP/$node/")
done
for pid in "${stopped[@]}"; do
  kill -0 "$pid" 2>/dev/null && leftover+=("$pid")
done
if ((${#leftover[@]})); then
  echo "catdog cluster: killing ${#leftover[@]} leftover process(es): ${leftover[*]}"
  kill -KILL "${leftover[@]}" 2>/dev/null || true
fi

rm -f "$CLUSTER_DIR/head.pid" "$CLUSTER_DIR/worker.pid" "$STATE_FILE" "$CLUSTER_DIR/env.sh"
echo "catdog cluster: stopped (logs kept in $CLUSTER_TMP and $CLUSTER_DIR; the token stays in $TOKEN_FILE)"
