"""Device mesh ('data', 'fsdp', 'tensor'), with 'dcn' in front across TPU slices; logical axis rules;
shardings of abstract pytrees.

Parameters and activations carry logical axis names (see model.py); `LOGICAL_RULES` maps them to
mesh axes. With `slices` > 1 (multislice: several TPU slices joined by the data-center network, DCN)
the mesh is ('dcn', 'data', 'fsdp', 'tensor'): each slice holds a whole ('data', 'fsdp', 'tensor') mesh, the
batch is split over dcn x data x fsdp, weights are never split over dcn (the gradients' reduction is what
crosses it). Rules naming an axis the mesh lacks drop it, so one rule set serves both. Shardings come from
abstract trees (`jax.eval_shape`) whose leaves are boxed in `nn.Partitioned`, so nothing is materialized
before it is placed. A dimension that a mesh axis does not divide evenly is replicated over that axis.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ouro_jax import validate

MESH_AXES = ("data", "fsdp", "tensor")   # within one slice (ICI)
DCN_AXIS = "dcn"                          # across slices; only in the mesh when there are several
BATCH_AXES = (DCN_AXIS, "data", "fsdp")

# Logical name -> mesh axes. Batch over dcn x data x fsdp; weights fully sharded over fsdp on their
# embedding axis and split Megatron-style over tensor on heads / mlp / vocab.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
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


def _resolve_sizes(sizes: list[int], devices: int) -> list[int]:
    """The ('data', 'fsdp', 'tensor') sizes for `devices` devices, the -1 (if any) filled in."""
    if len(sizes) != len(MESH_AXES):
        raise ShardingError(f"mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh sizes must be >= 1 with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % known:
            raise ShardingError(f"{devices} devices are not divisible by the fixed mesh sizes "
                                f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                            f"{devices} available")
    return sizes


def _slice_devices(devices: list, slices: int, sizes: list[int]) -> np.ndarray:
    """Devices as [slices, data, fsdp, tensor]: grouped by their `slice_index` when they carry several (real
    or AOT multislice TPU devices, each slice laid out for its ICI), else in consecutive blocks (CPU, GPU)."""
    if len({getattr(d, "slice_index", None) for d in devices}) > 1:
        try:
            return mesh_utils.create_hybrid_device_mesh((1, *sizes), (slices, 1, 1, 1), devices,
                                                        allow_split_physical_axes=True)
        except ValueError as e:
            raise ShardingError(f"mesh.slices={slices} does not match the devices' slices: {e}") from None
    return np.asarray(devices, dtype=object).reshape(slices, *sizes)


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes; one size may be -1 (all remaining devices).

    `shape["slices"]` > 1 (default 1) makes it ('dcn', 'data', 'fsdp', 'tensor') with dcn = slices and the
    three sizes counted within one slice."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
    slices = validate.integer("mesh.slices", shape.get("slices", 1) if isinstance(shape, dict) else 1, low=1)
    if len(devices) % slices:
        raise ShardingError(f"mesh.slices={slices} does not divide the {len(devices)} devices")
    sizes = _resolve_sizes(sizes, len(devices) // slices)
    if slices == 1:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    axes = (DCN_AXIS, *MESH_AXES)
    return Mesh(_slice_devices(devices, slices, sizes), axes, axis_types=(AxisType.Auto,) * len(axes))


def mesh_rules(mesh: Mesh, rules=LOGICAL_RULES) -> tuple[tuple[str, Any], ...]:
    """`rules` with the mesh axes `mesh` lacks dropped (the 'dcn' of the batch on a one-slice mesh)."""
    def keep(axes):
        if axes is None or isinstance(axes, str):
            return axes if axes is None or axes in mesh.axis_names else None
        kept = tuple(a for a in axes if a in mesh.axis_names)
        return kept or None
    return tuple((name, keep(axes)) for name, axes in rules)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_RULES):
    """Context for tracing a model under `mesh`: `nn.with_logical_constraint` becomes a real constraint."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(mesh_rules(mesh, rules)):
        yield


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec of an array with logical axis `names`; undivisible dimensions stay replicated."""
    mesh_axes = nn.logical_to_mesh_axes(tuple(names), mesh_rules(mesh, rules))
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


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch: dcn x data x fsdp (dcn only on a multislice mesh)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """Batch arrays [B, S]: rows split over (dcn x) data x fsdp."""
    return PartitionSpec(batch_axes(mesh), None)


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch rows are split into."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    if batch_size % batch_shards(mesh):
        raise ShardingError(f"global batch size {batch_size} is not divisible by "
                            f"{' x '.join(batch_axes(mesh))} = {batch_shards(mesh)}")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays split over (dcn x) data x fsdp (works multi-host)."""
    sharding = NamedSharding(mesh, batch_spec(mesh))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
