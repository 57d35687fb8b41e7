"""Starting or joining Ray, and checking up front that a job can ever be scheduled."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def cpu_model() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it (else what ``platform`` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class ResourceError(Exception):
    """A job that the cluster can never schedule, phrased as one line."""


def init_ray(cfg, *, trains: bool = False) -> bool:
    """Join ``RAY_ADDRESS`` when set (``ray job submit`` sets it), else start an embedded Ray, with
    the dashboard when ``ray.dashboard`` says so (unset: when the job ``trains``).

    Returns True when this process started its own Ray (so its size is fixed and known).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    kwargs = {}
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    dashboard = trains if cfg.ray.dashboard is None else cfg.ray.dashboard
    start_local_ray(include_dashboard=dashboard and dashboard_installed(), **kwargs)
    return True


# Ray gives a new node's raylet a fixed 30 s to register with its GCS (ray/_private/node.py).  On a
# machine busy enough (2 cores, two test workers each running Ray) a start misses that now and then,
# and the job would fail before doing anything.
LOCAL_RAY_STARTS = 3
_START_TIMEOUT = "timed out during startup"


# Ray Train starts a PreemptionWatcher actor per run to log which nodes the autoscaler drains (spot
# preemption).  An embedded Ray is one node that nothing drains, so the actor only costs: 1.0-1.4 CPU-s
# per Train run on 2 cores (bench/NOTES.md, "Embedded Ray: Train's preemption watcher").  The raylet
# and the TrainController inherit this process's environment; a value the user set is kept.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def start_local_ray(**kwargs: Any) -> None:
    """``ray.init(address="local")``, started again (up to ``LOCAL_RAY_STARTS`` times in all) when
    Ray's own start times out, once the half-started node's processes are stopped.  Train runs on it
    start no preemption watcher unless ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` says so."""
    import ray

    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    for start in range(1, LOCAL_RAY_STARTS + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as exc:
            if _START_TIMEOUT not in str(exc) or start == LOCAL_RAY_STARTS or not _stop_half_started_node(exc):
                raise
            logger.warning(
                "Ray's start timed out (a busy machine?): starting it again (%d of %d)", start + 1, LOCAL_RAY_STARTS
            )


def _stop_half_started_node(exc: BaseException) -> bool:
    """Kill the processes of the Ray node whose start raised ``exc`` (the ``Node`` in the traceback);
    False when there is none to be found, so that nothing is started beside a half-started node."""
    import traceback

    from ray._private.node import Node

    nodes = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(exc.__traceback__)]
    node = next((n for n in nodes if isinstance(n, Node)), None)
    if node is None:
        return False
    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    return True


def dashboard_installed() -> bool:
    """Whether Ray's dashboard can start: plain ``ray`` (``ray[data,train]``, the GPU kit) lacks its
    packages, and asking for it there fails ``ray.init``.  Says once why it starts without it."""
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        logger.warning(
            "ray.dashboard: starting Ray without its dashboard: its packages are missing (%s; "
            "pip install 'ray[default]'). Ray Train then cannot release a dead run's resources itself.",
            missing,
        )
    return missing is None


def _fits_on_one_node(cpus: float, gpus: float) -> bool:
    import ray

    return any(
        node["Resources"].get("CPU", 0) >= cpus and node["Resources"].get("GPU", 0) >= gpus
        for node in ray.nodes()
        if node.get("Alive")
    )


def _check_placement(
    job: str, count: int, cpus: float, gpus: float, *, cpu_why: str, gpu_why: str, unit: str, advice: str
) -> float:
    """Refuse ``count`` workers of ``cpus``/``gpus`` each that the cluster can never place, in
    total or on any one node; return the cluster's CPU count."""
    import ray

    total = ray.cluster_resources()
    problems = []
    if count * cpus > total.get("CPU", 0):
        problems.append(f"{count * cpus:g} CPUs ({cpu_why})")
    if count * gpus > total.get("GPU", 0):
        problems.append(f"{count * gpus:g} GPUs ({gpu_why})")
    if not problems and not _fits_on_one_node(cpus, gpus):
        problems.append(f"a node with {cpus:g} CPUs and {gpus:g} GPUs for each {unit}")
    if problems and not os.environ.get("CATDOG_AUTOSCALING_CLUSTER"):
        raise ResourceError(
            f"{job} needs {' and '.join(problems)} but the Ray cluster has {total.get('CPU', 0):g} CPUs and "
            f"{total.get('GPU', 0):g} GPUs; {advice} "
            "(set CATDOG_AUTOSCALING_CLUSTER=1 on an autoscaling cluster to skip this check)"
        )
    return total.get("CPU", 0)


def _check_decode_room(job: str, cfg, held_cpus: float, cluster_cpus: float, holders: str, advice: str) -> None:
    """Each decode task reserves ``data.decode_threads`` CPUs: refuse when no node has that many, and
    warn when the workers or actors (``held_cpus``) leave fewer free than one task needs."""
    threads = cfg.data.decode_threads
    why = f"data.decode_threads={threads}"
    advice = "lower data.decode_threads, or add larger nodes"
    _check_placement(job, 1, threads, 0, cpu_why=why, gpu_why=why, unit="decode task", advice=advice)
    if held_cpus >= cluster_cpus:
        logger.warning(
            "%s take all %g CPUs; Ray Data will have none left to decode images. Raise ray.num_cpus or %s.",
            holders,
            cluster_cpus,
            advice,
        )
    elif cluster_cpus - held_cpus < threads:
        logger.warning(
            "%s leave %g of %g CPUs, fewer than the %d each decode task reserves (data.decode_threads); "
            "Ray Data will not decode images. Lower data.decode_threads or raise ray.num_cpus.",
            holders,
            cluster_cpus - held_cpus,
            cluster_cpus,
            threads,
        )


def check_train_resources(cfg) -> None:
    """Fail instead of letting Ray Train wait forever for workers that can never be placed."""
    workers, cpus = cfg.train.num_workers, cfg.train.cpus_per_worker
    cluster_cpus = _check_placement(
        "train",
        workers,
        cpus,
        1 if cfg.train.use_gpu else 0,
        cpu_why=f"train.num_workers={workers} x train.cpus_per_worker={cpus:g}",
        gpu_why=f"train.num_workers={workers}, train.use_gpu=true",
        unit="worker",
        advice="lower train.num_workers or train.cpus_per_worker, or add nodes",
    )
    held = 0 if cfg.train.use_gpu else workers * cpus
    _check_decode_room("train", cfg, held, cluster_cpus, "Train workers", "lower train.cpus_per_worker")


def check_predict_resources(cfg) -> None:
    """The predictor actor pool has a fixed size: make sure every actor can be placed, and
    warn when the actors leave no CPU for the decode tasks that feed them."""
    actors, cpus, gpus = cfg.predict.concurrency, cfg.predict.cpus_per_actor, cfg.predict.num_gpus
    cluster_cpus = _check_placement(
        "predict",
        actors,
        cpus,
        gpus,
        cpu_why=f"predict.concurrency={actors} x predict.cpus_per_actor={cpus:g}",
        gpu_why=f"predict.concurrency={actors} x predict.num_gpus={gpus:g}",
        unit="predictor actor",
        advice="lower predict.concurrency, cpus_per_actor or num_gpus, or add nodes",
    )
    _check_decode_room("predict", cfg, actors * cpus, cluster_cpus, "Predictor actors", "lower predict.concurrency")


def worker_nodes(cpus: float, gpus: float) -> list[dict]:
    """Alive nodes with room for one worker of ``cpus`` CPUs and ``gpus`` GPUs (where Ray may place one)."""
    import ray

    return [
        node
        for node in ray.nodes()
        if node.get("Alive") and node["Resources"].get("CPU", 0) >= cpus and node["Resources"].get("GPU", 0) >= gpus
    ]


def run_on_worker_nodes(
    fn: Callable[..., Any], *args: Any, cpus: float, gpus: float, timeout_s: float = 300
) -> dict[str, Any]:
    """``fn(*args)`` once on every node that could run a worker, as a zero-CPU task pinned to the
    node; returns {node name: result}.  Nodes that do not answer within ``timeout_s`` are left out
    with a warning (the check is a courtesy: the job itself will meet the same node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {}
    for node in worker_nodes(cpus, gpus):
        name = f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        refs[name] = task.options(scheduling_strategy=strategy).remote(*args)
    if not refs:
        return {}
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [name for name, ref in refs.items() if ref in pending]
        logger.warning("no answer within %gs from node(s) %s; not checked", timeout_s, ", ".join(late))
        for ref in pending:
            ray.cancel(ref, force=True)
    return {name: ray.get(ref) for name, ref in refs.items() if ref in ready}
