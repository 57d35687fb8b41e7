# Local multi-node Ray cluster and job submission (included from the Makefile).
#
#   make cluster-up                      head + one worker node on this machine, token auth on
#   make submit-train [CONFIG=...]       ray job submit jobs/train.py, follow logs, exit with the job status
#   make submit-predict [CONFIG=...]     same for jobs/predict.py
#   make submit-run [CONFIG=...]         submit-train, then submit-predict
#   make cluster-status                  nodes and resources (ray status)
#   make cluster-down                    stop only what cluster-up started
#
# Settings (see cluster/scripts/common.sh): CLUSTER_DIR, CLUSTER_PORT (GCS port; +1 is the dashboard / job
# server), CLUSTER_HEAD_CPUS, CLUSTER_WORKER_CPUS, CLUSTER_OBJECT_STORE_MB, CLUSTER_TMP.
# The token is $(CLUSTER_DIR)/auth_token; `source $(CLUSTER_DIR)/env.sh` sets up a shell for the plain ray CLI.

CLUSTER_DIR ?= .cluster
CLUSTER_PORT ?= 23800
CLUSTER_HEAD_CPUS ?= 2
CLUSTER_WORKER_CPUS ?= 3
CLUSTER_OBJECT_STORE_MB ?= 2048
CLUSTER_ENV = CLUSTER_DIR="$(CLUSTER_DIR)" CLUSTER_PORT="$(CLUSTER_PORT)" CLUSTER_HEAD_CPUS="$(CLUSTER_HEAD_CPUS)" \
  CLUSTER_WORKER_CPUS="$(CLUSTER_WORKER_CPUS)" CLUSTER_OBJECT_STORE_MB="$(CLUSTER_OBJECT_STORE_MB)" \
  CLUSTER_VENV_BIN="$(abspath $(VENV))/bin" $(if $(CLUSTER_TMP),CLUSTER_TMP="$(CLUSTER_TMP)")
# The job runs from an unpacked copy of the repo: submit.sh makes local relative paths absolute.
SUBMIT = $(CLUSTER_ENV) bash cluster/scripts/submit.sh

.PHONY: cluster-up cluster-down cluster-status submit-train submit-predict submit-run

cluster-up: $(STAMP)
	@$(CLUSTER_ENV) bash cluster/scripts/up.sh

cluster-down:
	@$(CLUSTER_ENV) bash cluster/scripts/down.sh

cluster-status: $(STAMP)
	@$(CLUSTER_ENV) bash cluster/scripts/status.sh

submit-train: $(STAMP) check-data
	$(JOB_SETS) $(SUBMIT) train --config "$$CONFIG" "$${sets[@]}"

submit-predict: $(STAMP) check-data
	$(JOB_SETS) $(SUBMIT) predict --config "$$CONFIG" "$${sets[@]}"

# Sequential on purpose (also under make -j): predict reads the model that train wrote.
submit-run: $(STAMP) check-data
	$(JOB_SETS) $(SUBMIT) train --config "$$CONFIG" "$${sets[@]}"
	$(JOB_SETS) $(SUBMIT) predict --config "$$CONFIG" "$${sets[@]}"
