"""Device mesh ('data', 'fsdp', 'tensor'), logical axis rules, and shardings of abstract pytrees.

Parameters and activations carry logical axis names (see model.py); `LOGICAL_RULES` maps them to
mesh axes. Shardings come from abstract trees (`jax.eval_shape`) whose leaves are boxed in
`nn.Partitioned`, so nothing is materialized before it is placed. A dimension that a mesh axis
does not divide evenly is replicated over that axis instead of failing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Batch over data x fsdp; weights fully sharded over fsdp on their
# embedding axis and split Megatron-style over tensor on heads / mlp / vocab.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


class ShardingError(ValueError):
    """A mesh that does not fit the devices or the batch."""


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
        raise ShardingError(f"mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh sizes must be >= 1 with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices are not divisible by the fixed mesh sizes "
                                f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                            f"{len(devices)} available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_RULES):
    """Context for tracing a model under `mesh`: `nn.with_logical_constraint` becomes a real constraint."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec of an array with logical axis `names`; undivisible dimensions stay replicated."""
    mesh_axes = nn.logical_to_mesh_axes(tuple(names), rules)
    spec = [axes if dim % _axis_size(mesh, axes) == 0 else None for axes, dim in zip(mesh_axes, shape)]
    return PartitionSpec(*spec)


def _is_boxed(x) -> bool:
    return isinstance(x, nn.Partitioned)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays, unboxed.

    Boxed leaves are sharded by their logical names; everything else (step counters, optimizer
    counts, unnamed arrays) is replicated.
    """
    def one(leaf):
        if _is_boxed(leaf):
            return NamedSharding(mesh, logical_spec(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, abstract_tree, is_leaf=_is_boxed)


def unbox_abstract(abstract_tree: Any) -> Any:
    """Strips `nn.Partitioned` boxes (without applying constraints)."""
    return jax.tree.map(lambda x: x.value if _is_boxed(x) else x, abstract_tree, is_leaf=_is_boxed)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings (inputs for `.lower(...)` or orbax restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def without_axis(shardings: Any, axis: str = "fsdp") -> Any:
    """`shardings` with mesh `axis` dropped from every spec: an array constrained to them is whole
    along that axis (e.g. FSDP-sharded weights gathered once, outside the recurrent loop)."""
    def drop(entry):
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a != axis)
        return axes[0] if len(axes) == 1 else (axes or None)
    return jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*map(drop, s.spec))), shardings)


def batch_spec() -> PartitionSpec:
    """Batch arrays [B, S]: rows split over data x fsdp."""
    return PartitionSpec(("data", "fsdp"), None)


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ShardingError(f"global batch size {batch_size} is not divisible by data x fsdp = {shards}")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays split over data x fsdp (works multi-host)."""
    sharding = NamedSharding(mesh, batch_spec())
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
