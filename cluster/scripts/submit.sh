#!/usr/bin/env bash
# Submit one catdog job to the local cluster through the job server, follow its logs, and exit with its
# status (0 only for SUCCEEDED).
#
#   submit.sh train   --config configs/quick.yaml [--set key=value ...] [--restart]
#   submit.sh predict --config configs/quick.yaml [--set key=value ...] [--model URI] [--input URI] ...
#   submit.sh evaluate --config ... --input URI
#
# The repo travels as the job's working dir (code and configs only: see EXCLUDES).  The job runs from
# the unpacked copy somewhere under the cluster's temp dir, so local relative paths in the config
# (storage.root, data.train, data.test, a checkpoint given as init) and in --model/--input/--output are
# made absolute here, against the directory make runs in.  Object-store URIs are left alone.
# The last stdout line is the job's result: the URI of best.json / submission.csv.
# Ctrl-C stops the job on the cluster too.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

JOB="${1:-}"
[[ "$JOB" =~ ^(train|predict|evaluate)$ ]] || die "usage: submit.sh train|predict|evaluate --config FILE [job args...]"
shift
load_state
use_cluster_auth
pid_is_ours "${HEAD_PID:-}" "$CLUSTER_TMP/head" || die "the cluster in $CLUSTER_DIR is not running; 'make cluster-up' starts it"

# The job's arguments with local relative paths made absolute (NUL-separated, so spaces survive).
ARGS=()
while IFS= read -r -d '' arg; do
  ARGS+=("$arg")
done < <("$PY" - "$REPO" "$@" <<'EOF'
import argparse, os, sys

from catdog.config import ConfigError, load_config

repo, argv = sys.argv[1], sys.argv[2:]
parser = argparse.ArgumentParser(add_help=False)
parser.add_argument("--config")
parser.add_argument("--set", dest="overrides", action="append", default=[])
for flag in ("--model", "--input", "--output"):
    parser.add_argument(flag)
known, _ = parser.parse_known_args(argv)
if not known.config:
    sys.exit("catdog cluster: --config is required")


def local_relative(value):
    return bool(value) and "://" not in value and not os.path.isabs(value)


# A config inside the repo travels with the working dir: name it relative to the repo.  One outside
# it only works on a cluster that shares this machine's files: name it absolutely.
config = os.path.abspath(known.config)
config = os.path.relpath(config, repo) if os.path.commonpath([config, repo]) == repo else config
out = [a for a in argv if not a.startswith("--config=")]
out = [config if i and out[i - 1] == "--config" else a for i, a in enumerate(out)]
if "--config" not in out:
    out += ["--config", config]
try:
    cfg = load_config(known.config, known.overrides)
except ConfigError as exc:
    sys.exit(f"error: {exc}")
extra = []
for key, value in (("storage.root", cfg.storage.root), ("data.train", cfg.data.train), ("data.test", cfg.data.test),
                   ("train.init", cfg.train.init)):
    if local_relative(value) and (not key.endswith("init") or os.path.exists(value)):
        extra += ["--set", f"{key}={os.path.abspath(value)}"]
for index, spec in enumerate(cfg.models):
    if spec.init and local_relative(spec.init) and os.path.exists(spec.init):
        extra += ["--set", f"models.{index}.init={os.path.abspath(spec.init)}"]
for flag in ("--model", "--input", "--output"):
    value = getattr(known, flag[2:])
    if local_relative(value):
        extra += [flag, os.path.abspath(value)]
sys.stdout.write("".join(arg + "\0" for arg in out + extra))
EOF
)
((${#ARGS[@]})) || exit 2

# gitignore-style, relative to the repo; no trailing slashes, so whole folders are skipped unread.
RUNTIME_ENV_JSON='{"excludes": ["/.git", "/.venv", "/.cluster", "/runs", "/data", "/shared", "/bench/results",
  "__pycache__", "*.egg-info", "/.pytest_cache", "/.ruff_cache", "*.parquet", "*.pt", "*.jpg", "*.zip"],
  "env_vars": {"PYTHONUNBUFFERED": "1"}}'

SUBMISSION_ID="catdog-$JOB-$(date +%Y%m%d-%H%M%S)-$RANDOM"
trap 'echo "catdog cluster: interrupted; stopping job $SUBMISSION_ID" >&2;
      "$RAY" job stop --address "$CLUSTER_ADDRESS" --no-wait "$SUBMISSION_ID" >/dev/null 2>&1 || true; exit 130' INT TERM

cd "$REPO"
set +e
"$RAY" job submit --address "$CLUSTER_ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir "$REPO" \
  --runtime-env-json "$RUNTIME_ENV_JSON" -- python "jobs/$JOB.py" "${ARGS[@]}"
rc=$?
set -e

# The job's final status and its result URI, from the job server.
mapfile -t OUTCOME < <("$PY" - "$CLUSTER_ADDRESS" "$SUBMISSION_ID" <<'EOF' 2>/dev/null
import re
import sys

from ray.job_submission import JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
print(client.get_job_status(sys.argv[2]).value)
# The driver prints the URI last, but worker log lines (prefixed "(Actor pid=...)") can arrive after it:
# take the last line that is a bare URI or path.
uri = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|/)\S*$")
lines = [line.strip() for line in client.get_job_logs(sys.argv[2]).splitlines()]
print(next((line for line in reversed(lines) if uri.match(line)), ""))
EOF
)
STATUS="${OUTCOME[0]:-}"
if [[ "$STATUS" != "SUCCEEDED" ]]; then
  echo "catdog cluster: job $SUBMISSION_ID ended ${STATUS:-in an unknown state} (ray job submit exit $rc)" >&2
  exit $((rc ? rc : 1))
fi
echo "catdog cluster: job $SUBMISSION_ID SUCCEEDED"
# Repeat the job's result line so that it is the last stdout line here too.
echo "${OUTCOME[1]:-}"
