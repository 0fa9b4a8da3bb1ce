"""Device mesh, batch sharding and host-to-global arrays.

The mesh uses `AxisType.Auto` axes (the default of `jax.make_mesh` is Explicit). With Auto,
`jax.jit` over `NamedSharding` arrays lets XLA propagate shardings through the model as
big_vision does, and `jax.shard_map` (the objectives, collectives) takes the mesh as given.
Explicit axes put shardings into the types, and ordinary model code (reshapes, einsums over
a sharded batch) then needs annotations everywhere; we don't need that control.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding


def make_mesh(
    num_devices: int | None = None,
    axes: Sequence[str] = ("data",),
    *,
    shape: Sequence[int] | None = None,
) -> Mesh:
    """A mesh over the first `num_devices` devices (all by default).

    `shape` gives the size of each axis; by default every device goes to the first axis and
    the others have size 1 (so ("data", "model") is pure data parallelism until asked).
    """
    devices = jax.devices()
    num = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= num <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    axes = tuple(axes)
    if shape is None:
        shape = (num,) + (1,) * (len(axes) - 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axes) or int(np.prod(shape)) != num:
        raise ValueError(f"mesh shape {shape} for axes {axes} does not hold {num} devices")
    return jax.make_mesh(
        shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices[:num]
    )


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Leading (batch) dimension split over `axis`, the rest replicated."""
    return NamedSharding(mesh, jax.P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, scalars)."""
    return NamedSharding(mesh, jax.P())


def check_batch_divisible(batch_size: int, mesh: Mesh, axis: str = "data") -> None:
    """Raises ValueError unless the global batch splits evenly over the `axis` devices."""
    size = mesh.shape[axis]
    if batch_size % size:
        lower = batch_size // size * size
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the {size} devices of mesh "
            f"axis {axis!r}; use a multiple of {size} (e.g. {lower or size} or {lower + size})"
        )


def to_global(
    batch: Mapping[str, np.ndarray], mesh: Mesh, axis: str = "data"
) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global jax.Arrays sharded over `axis`.

    Every process passes its own rows (local batch = global batch / process count); arrays
    with no batch dimension (0-d) are taken as identical on every process and replicated.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[key] = jax.make_array_from_process_local_data(replicated(mesh), value)
            continue
        check_batch_divisible(value.shape[0] * jax.process_count(), mesh, axis)
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, axis), value)
    return out
