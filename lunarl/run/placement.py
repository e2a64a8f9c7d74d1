"""Where a run's arrays live: one ``jax.sharding.Mesh`` with axes ``seed`` and ``data``.

``seed`` splits independent seeds (they never communicate, so it scales with no collective);
``data`` splits the env batch, which agents mark per TrainState leaf (``Agent.env_axes``): a
leaf marked ``ENV_AXIS`` is sharded on ``data``, every other leaf (parameters, optimiser state,
observation statistics, keys) is replicated across it. The compiled chunk keeps those shardings
across its scan, and XLA's partitioner inserts the collectives: a mean over the env batch or the
running observation statistics are reductions over the whole sharded batch, so N data devices
give the same update as one (to float rounding). Arrays an agent builds from the batch that
are not TrainState leaves (PPO's shuffled minibatches) are gathered by the partitioner unless
the agent splits them with ``base.split_on_data`` (PPO does: each device then computes its share
of each minibatch's gradient and XLA all-reduces them); the chunk is traced under this mesh,
seeds vmapped as ``seed``, for that.

The mesh spans ``jax.devices()``: with several processes (``lunarl.run.distributed``) that is
every process's devices, and each process holds only its own shards. The train app builds one
``Placement`` and passes it to everything that creates or restores state: ``init``, Orbax
restore targets (so a checkpoint written on N devices restores on M), the compiled chunk and
the evaluator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lunarl.agents.base import DATA_AXIS_NAME, SEED_AXIS_NAME, Agent

__all__ = ["MeshTooWide", "Placement"]


class MeshTooWide(ValueError):
    """The env batch does not split evenly over the ``data`` axis."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """A ``(seed, data)`` device mesh and the shardings of a run's seed-stacked pytrees."""

    mesh: Mesh

    @classmethod
    def for_seeds(cls, num_seeds: int, devices: Sequence[jax.Device] | None = None) -> Placement:
        """Seeds only: split over ``devices`` (default: this host's) when they divide evenly,
        else one device; ``data`` has size 1. For restoring a run anywhere (``lunarl.evaluate``)."""
        devices = list(devices if devices is not None else jax.local_devices())
        n = len(devices) if num_seeds % len(devices) == 0 else 1
        return cls(Mesh(np.array(devices[:n]).reshape(n, 1), (SEED_AXIS_NAME, DATA_AXIS_NAME)))

    @classmethod
    def for_run(cls, num_seeds: int, num_envs: int, devices: Sequence[jax.Device] | None = None) -> Placement:
        """All of ``devices`` (default: ``jax.devices()``, every process's): the seed axis takes
        the largest share that divides both the seeds and the device count, and the devices left
        over shard each seed's env batch on ``data``. Raises ``MeshTooWide`` when ``num_envs``
        does not divide by the ``data`` size."""
        devices = list(devices if devices is not None else jax.devices())
        seeds = math.gcd(num_seeds, len(devices))
        data = len(devices) // seeds
        if num_envs % data:
            raise MeshTooWide(
                f"{num_envs} envs per seed do not split over a data axis of {data} devices "
                f"({len(devices)} devices, {seeds} on the seed axis)"
            )
        return cls(Mesh(np.array(devices).reshape(seeds, data), (SEED_AXIS_NAME, DATA_AXIS_NAME)))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def data_size(self) -> int:
        return int(self.mesh.shape[DATA_AXIS_NAME])

    @property
    def seeds(self) -> NamedSharding:
        """Sharding of arrays with a leading seed axis and nothing else to split (keys, params)."""
        return NamedSharding(self.mesh, PartitionSpec(SEED_AXIS_NAME))

    @property
    def replicated(self) -> NamedSharding:
        """Every device holds the whole array (metrics, flags the host reads)."""
        return NamedSharding(self.mesh, PartitionSpec())

    def state_shardings(self, agent: Agent, states: Any) -> Any:
        """Shardings of a seed-stacked TrainState (arrays or ``ShapeDtypeStruct``s, ``[S, ...]``):
        the seed axis on ``seed``, then each leaf's ``agent.env_axes`` spec."""
        one_seed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), states)
        specs = agent.env_axes(one_seed)

        def place(spec: PartitionSpec, x: Any) -> NamedSharding:
            if len(spec) > len(x.shape) - 1:
                raise ValueError(f"agent {agent.name!r}: env_axes spec {spec} has more axes than a leaf of shape {x.shape[1:]}")
            return NamedSharding(self.mesh, PartitionSpec(SEED_AXIS_NAME, *spec))

        return jax.tree.map(place, specs, states)

    def describe(self) -> str:
        shape = dict(self.mesh.shape)
        processes = len({d.process_index for d in self.mesh.devices.flat})
        where = f" in {processes} processes" if processes > 1 else ""
        return (
            f"mesh seed={shape[SEED_AXIS_NAME]} x data={shape[DATA_AXIS_NAME]} over {self.num_devices} "
            f"{self.mesh.devices.flat[0].platform} device(s){where}"
        )
