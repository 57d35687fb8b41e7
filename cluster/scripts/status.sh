#!/usr/bin/env bash
# Nodes and resources of the local cluster (`ray status`), with the cluster's token.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

load_state
use_cluster_auth
pid_is_ours "${HEAD_PID:-}" "$CLUSTER_TMP/head" || die "the cluster in $CLUSTER_DIR is not running; 'make cluster-up' starts it"
echo "dashboard / job server: $CLUSTER_ADDRESS    token: $TOKEN_FILE"
exec "$RAY" status --address "$GCS_ADDRESS"
