"""Cluster manifests: every YAML under cluster/ parses, has the shape Ray and KubeRay expect, and every
repo file it names exists (configs also validate)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from catdog.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
KUBERAY_KINDS = {
    "kuberay/raycluster.yaml": "RayCluster",
    "kuberay/rayjob-train.yaml": "RayJob",
    "kuberay/rayjob-predict.yaml": "RayJob",
}
# jobs/train.py, configs/gpu.yaml, ... inside commands, entrypoints and runtime envs.
REPO_FILE = re.compile(r"(?<![\w./-])((?:jobs|configs)/[\w.-]+\.(?:py|ya?ml))(?![\w/-])")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", re.IGNORECASE)


def documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strings(node):
    """Every string value in a parsed YAML tree (embedded YAML such as runtimeEnvYAML included)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def test_expected_manifests_exist():
    names = {str(path.relative_to(CLUSTER)) for path in YAMLS}
    assert {"aws.yaml", *KUBERAY_KINDS} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    assert documents(path), f"{path} has no YAML documents"


@pytest.mark.parametrize("name, kind", KUBERAY_KINDS.items())
def test_kuberay_shape(name, kind):
    import ray

    (doc,) = documents(CLUSTER / name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    spec = ray_cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__, "the cluster's Ray must match the client's"
    # Token authentication from a user-made Secret; KubeRay injects RAY_AUTH_MODE / RAY_AUTH_TOKEN.
    assert spec["authOptions"] == {"mode": "token", "secretName": "catdog-ray-auth"}

    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert spec["workerGroupSpecs"], "no worker group"
    gpu_groups = [
        group
        for group in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]

    images = {template["spec"]["containers"][0]["image"] for _, template in pod_templates(spec)}
    assert len(images) == 1, f"head and workers must share one image, got {images}"

    # Autoscaling cluster: catdog's up-front resource check must be told, in the job drivers' environment.
    if spec.get("enableInTreeAutoscaling"):
        if kind == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert runtime_env["env_vars"]["CATDOG_AUTOSCALING_CLUSTER"] == "1"
        else:
            head_env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
            assert head_env["CATDOG_AUTOSCALING_CLUSTER"]["value"] == "1"


@pytest.mark.parametrize("name", [n for n, k in KUBERAY_KINDS.items() if k == "RayJob"])
def test_rayjob_entrypoint(name):
    (doc,) = documents(CLUSTER / name)
    job = name.removeprefix("kuberay/rayjob-").removesuffix(".yaml")
    assert doc["spec"]["entrypoint"].split() == ["python", f"jobs/{job}.py", "--config", "configs/gpu.yaml"]
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"], "the job needs the repo as its working dir"
    # The submitter Pod packages a local working_dir: only K8sJobMode / SidecarMode run `ray job submit`.
    assert doc["spec"].get("submissionMode", "K8sJobMode") in ("K8sJobMode", "SidecarMode")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("name", KUBERAY_KINDS)
def test_kuberay_secrets_come_from_secrets(name):
    for doc in documents(CLUSTER / name):
        assert doc["kind"] != "Secret", "no Secret objects (and so no secret values) in the manifests"
        for _, template in pod_templates(ray_cluster_spec(doc)):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{name}: {env['name']} is a literal"
                        assert env["valueFrom"]["secretKeyRef"]["name"], env


def test_aws_config_is_a_valid_cluster_launcher_config():
    pytest.importorskip("jsonschema")
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = documents(CLUSTER / "aws.yaml")
    validate_config(prepare_config(config))  # what `ray up` runs first

    assert config["provider"]["type"] == "aws"
    assert ray.__version__ in config["docker"]["image"], "the cluster's Ray must match the client's"
    head_type = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head_type}
    assert any(re.match(r"g[56]\.", w["node_config"]["InstanceType"]) for w in workers.values())
    assert all(w["min_workers"] == 0 and w["max_workers"] > 0 for w in workers.values()), "GPU workers autoscale"
    assert any("pip install" in c and "catdog" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start and "CATDOG_AUTOSCALING_CLUSTER=1" in start
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    # The token travels as a file from the user's machine, never as a literal.
    text = " ".join(strings(config))
    assert not re.search(r"RAY_AUTH_TOKEN=|AWS_SECRET_ACCESS_KEY=|AWS_ACCESS_KEY_ID=", text)
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_named_repo_files_exist_and_configs_validate():
    named = set()
    for path in YAMLS:
        for doc in documents(path):
            for text in strings(doc):
                named.update(REPO_FILE.findall(text))
    assert {"jobs/train.py", "jobs/predict.py", "configs/gpu.yaml"} <= named
    for name in sorted(named):
        assert (REPO / name).is_file(), f"cluster manifests name {name}, which does not exist"
        if name.startswith("configs/"):
            load_config(REPO / name)  # raises ConfigError with the offending key


@pytest.mark.parametrize("script", sorted((CLUSTER / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_cluster_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
