"""Where a run's arrays live: one ``jax.sharding.Mesh`` with axes ``seed`` and ``data``.

``seed`` splits independent seeds (they never communicate, so it scales with no collective);
``data`` is for the env batch, which agents mark per TrainState leaf (``Agent.env_axes``). The
train app builds one ``Placement`` and passes it to everything that creates or restores state:
``init``, Orbax restore targets (so a checkpoint written on N devices restores on M), the
compiled chunk and the evaluator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lunarl.agents.base import DATA_AXIS_NAME, SEED_AXIS_NAME, Agent

__all__ = ["Placement"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A ``(seed, data)`` device mesh and the shardings of a run's seed-stacked pytrees."""

    mesh: Mesh

    @classmethod
    def for_seeds(cls, num_seeds: int, devices: Sequence[jax.Device] | None = None) -> Placement:
        """Seeds split over ``devices`` (default: this host's) when they divide evenly, else one
        device; ``data`` has size 1 (sharding the env batch is not switched on yet)."""
        devices = list(devices if devices is not None else jax.local_devices())
        n = len(devices) if num_seeds % len(devices) == 0 else 1
        return cls(Mesh(np.array(devices[:n]).reshape(n, 1), (SEED_AXIS_NAME, DATA_AXIS_NAME)))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def seeds(self) -> NamedSharding:
        """Sharding of arrays with a leading seed axis and nothing else to split (keys, params)."""
        return NamedSharding(self.mesh, PartitionSpec(SEED_AXIS_NAME))

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
        return f"mesh seed={shape[SEED_AXIS_NAME]} x data={shape[DATA_AXIS_NAME]} over {self.num_devices} {self.mesh.devices.flat[0].platform} device(s)"
