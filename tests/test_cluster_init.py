"""The per-node ``init`` check on a real two-node cluster where only the head node has the ImageNet weights.

The worker node gets its own ``TORCH_HOME`` (empty) and no way out to download the weights, as an
air-gapped GPU node would.  The driver runs on the head, where the weights are, so only a check on every
node can see the problem before ``fit()``.  Uses the cluster scripts through ``started_cluster``.
"""

from __future__ import annotations

import posixpath

import pytest
import torch
import torchvision
from test_cluster import overrides, started_cluster, submit

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WEIGHTS = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
# urllib (torch.hub's downloader) goes through the proxy and finds nothing listening; Ray's own
# connections are local and not proxied.
OFFLINE = "https_proxy=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 no_proxy=127.0.0.1,localhost"


@pytest.fixture(scope="module")
def head_only_weights(tmp_path_factory):
    head_home, worker_home = tmp_path_factory.mktemp("torch-head"), tmp_path_factory.mktemp("torch-worker")
    weights = head_home / "hub" / "checkpoints" / posixpath.basename(WEIGHTS.url)
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), weights)  # right shapes, random values
    with started_cluster(
        tmp_path_factory.mktemp("cluster"),
        TORCH_HOME=str(head_home),
        CLUSTER_WORKER_ENV=f"TORCH_HOME={worker_home} {OFFLINE}",
    ) as cluster:
        yield cluster, worker_home


def test_init_weights_missing_on_a_worker_node_stop_the_job_before_training(
    head_only_weights, small_real_data, tmp_path
):
    cluster, worker_home = head_only_weights
    storage = tmp_path / "runs"
    sets = overrides(
        {
            "data.train": small_real_data / "train",
            "data.test": small_real_data / "test1",
            "storage.root": storage,
            "run_name": "init-check",
            "models": "[mobilenet_v2]",
            "train.init": "imagenet",
            "train.max_failures": 2,
        }
    )
    result = submit(cluster, "train", sets)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # One line, exit code 2 (`ray job submit` repeats the job's last log lines when it fails).
    errors = sorted({line for line in output.splitlines() if "error:" in line})
    assert len(errors) == 1, output[-4000:]
    assert str(worker_home) in errors[0] and "[on node " in errors[0] and "1 of 2 nodes" in errors[0]
    assert "failed with exit code 2" in output
    # Stopped before the run folder was made: no Train worker started, no retry was spent.
    assert not (storage / "init-check").exists()
    assert "training 1 epochs" not in output and "Worker group" not in output
