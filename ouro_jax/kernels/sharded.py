"""Running a per-device kernel on sharded activations: `jax.shard_map` over batch and head axes.

Pallas kernels are not partitioned by XLA; each device runs the kernel on its own rows and heads.
Each argument and output is described by a layout string, one letter per dimension: "b" batch
(split over (dcn x) data x fsdp), "h" heads (split over tensor), "." whole. An axis a dimension is not
divisible by is left unsplit for that call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

from ouro_jax.sharding import BATCH_AXES

MESH_AXES = {"b": BATCH_AXES, "h": ("tensor",)}


def _usable(mesh, axes: Sequence[str], sizes: Sequence[int]):
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or any(s % math.prod(mesh.shape[a] for a in axes) for s in sizes):
        return None
    return axes


def per_device(fn: Callable, args: Sequence, layouts: Sequence[str], out_layouts):
    """fn(*args) run per device under the mesh in context (plain fn(*args) without one).

    out_layouts: a layout string per output leaf, in the output's pytree structure."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or all(mesh.shape[a] == 1 for a in mesh.axis_names):
        return fn(*args)
    sizes = {r: [a.shape[i] for a, lay in zip(args, layouts) for i, c in enumerate(lay) if c == r] for r in MESH_AXES}
    axes = {r: _usable(mesh, MESH_AXES[r], sizes[r]) for r in MESH_AXES}
    spec = lambda layout: P(*(axes.get(c) for c in layout))
    in_specs = tuple(spec(lay) for lay in layouts)
    out_specs = jax.tree.map(spec, out_layouts)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
