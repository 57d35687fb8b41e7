"""Starting or joining Ray, and checking up front that a job can ever be scheduled."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


class ResourceError(Exception):
    """A job that the cluster can never schedule, phrased as one line."""


def init_ray(cfg) -> bool:
    """Join ``RAY_ADDRESS`` when set (``ray job submit`` sets it), else start an embedded Ray.

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
    ray.init(address="local", **kwargs)
    return True


def check_train_resources(cfg) -> None:
    """Fail instead of letting Ray Train wait forever for workers that can never be placed."""
    import ray

    total = ray.cluster_resources()
    need_cpu = cfg.train.num_workers * cfg.train.cpus_per_worker
    need_gpu = cfg.train.num_workers if cfg.train.use_gpu else 0
    autoscaling = bool(os.environ.get("CATDOG_AUTOSCALING_CLUSTER"))
    problems = []
    if need_cpu > total.get("CPU", 0):
        problems.append(
            f"{need_cpu:g} CPUs (train.num_workers={cfg.train.num_workers} x "
            f"train.cpus_per_worker={cfg.train.cpus_per_worker:g})"
        )
    if need_gpu > total.get("GPU", 0):
        problems.append(f"{need_gpu} GPUs (train.num_workers={cfg.train.num_workers}, train.use_gpu=true)")
    if problems and not autoscaling:
        raise ResourceError(
            f"train needs {' and '.join(problems)} but the Ray cluster has {total.get('CPU', 0):g} CPUs and "
            f"{total.get('GPU', 0):g} GPUs; lower train.num_workers or add nodes "
            "(set CATDOG_AUTOSCALING_CLUSTER=1 on an autoscaling cluster to skip this check)"
        )
    if need_cpu >= total.get("CPU", 0) and not cfg.train.use_gpu:
        logger.warning(
            "Train workers take all %g CPUs; Ray Data will have none left to decode images. "
            "Raise ray.num_cpus or lower train.cpus_per_worker.",
            total.get("CPU", 0),
        )
