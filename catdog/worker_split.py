"""How Ray Train splits the train and validation datasets among its workers.

A module of its own, importing nothing of catdog's: Train's controller and dataset manager unpickle
this class, and whatever its module imports is imported in each of them for every training.
"""

from __future__ import annotations

from ray.train import DataConfig


class ShardConfig(DataConfig):
    """Train shards must be equal (DDP steps in lock-step); validation shards need not be, and
    splitting them unequally means no validation image is dropped."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if world_size == 1:
                # One worker reads the whole dataset itself: no split, so no SplitCoordinator actor (a
                # process start per dataset and run, bench/NOTES.md "Train's split coordinators").
                output[0][name] = ds.iterator()
                continue
            for i, shard in enumerate(ds.streaming_split(world_size, equal=(name == "train"))):
                output[i][name] = shard
        return output
