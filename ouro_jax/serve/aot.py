"""Ahead-of-time compilation of the serving programs for TPU topologies (libtpu, no TPU needed): the
memory each chip needs for the decode step, a prefill chunk and the commit, with the weights and
the KV cache of `slots` sequences sharded over the mesh. `serve_memory` is the arithmetic of the same
setup (weights + caches, no compiler) for a device that cannot be compiled for here (a GPU)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ouro_jax import sharding as shd
from ouro_jax.config import OuroConfig
from ouro_jax.inference.cache import KVCache, cache_bytes, cache_shape
from ouro_jax.inference.slot_decode import SlotBatch, decode_step
from ouro_jax.inference.slots import RowSettings, SlotSetup, cache_sharding, commit_prefill, prefill_chunk, slot_setup
from ouro_jax.model import abstract_params
from ouro_jax.train.aot import HBM_BYTES, topology_devices
from ouro_jax.validate import format_bytes

__all__ = ["ServeMemory", "ServeReport", "compile_serve_programs", "serve_memory"]


@dataclasses.dataclass(frozen=True)
class ServeReport:
    program: str
    topology: str
    mesh: dict[str, int]
    slots: int
    cache_length: int
    policy: str
    bytes_per_chip: int   # arguments + outputs - donated aliases + temporaries (0 when XLA refused it)
    hbm_bytes: int
    refused: str = ""     # XLA's out-of-memory message, when it refused to compile the program
    temp_bytes: int = 0   # of bytes_per_chip, the compiler's temporaries

    @property
    def fits(self) -> bool:
        return not self.refused and self.bytes_per_chip <= self.hbm_bytes

    def __str__(self) -> str:
        head = (f"{self.program} on {self.topology} {self.mesh}: {self.slots} slots x {self.cache_length} "
                f"({self.policy})")
        if self.refused:
            return f"{head}: DOES NOT FIT: {self.refused}"
        return (f"{head}: {self.bytes_per_chip / 2**30:.2f} GiB per chip of {self.hbm_bytes / 2**30:.0f} "
                f"-> {'fits' if self.fits else 'DOES NOT FIT'}")


def _abstract(shape, dtype, sharding=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _abstract_cache(setup: SlotSetup, policy: str, rows: int) -> KVCache:
    shape = cache_shape(setup.cfg, policy, setup.depth, rows, setup.cache_length)
    return KVCache(*(_abstract(shape, setup.cfg.compute_dtype, cache_sharding(setup, shape)),) * 2)


def _programs(setup: SlotSetup, chunk: int):
    """(name, lowered program) of the decode step, a prefill chunk and the commit, on abstract inputs."""
    boxed = abstract_params(setup.cfg)
    params = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), nn.unbox(boxed),
                          shd.tree_shardings(boxed, setup.mesh))
    rows = lambda *shape: RowSettings(*(_abstract(shape, dtype) for dtype in (
        jnp.float32, jnp.int32, jnp.float32, jnp.int32, jnp.float32, jnp.uint32, jnp.int32)))
    n = setup.slots
    cache, scratch = _abstract_cache(setup, setup.policy, n), _abstract_cache(setup, "full", 1)
    scalar = _abstract((), jnp.int32)
    return [("decode_step", decode_step.lower(params, cache, SlotBatch(_abstract((n,), jnp.int32),
                                                                       _abstract((n,), jnp.int32),
                                                                       _abstract((n,), jnp.bool_)),
                                              rows(n), setup=setup)),
            (f"prefill_chunk({chunk})", prefill_chunk.lower(params, scratch, _abstract((chunk,), jnp.int32), scalar,
                                                            scalar, rows(), setup=setup)),
            ("commit_prefill", commit_prefill.lower(cache, scratch, scalar, scalar, setup=setup))]


def _compiled_bytes(lowered) -> tuple[int, int, str]:
    """(bytes per chip, of them temporaries, "") of a lowered program, or (0, 0, XLA's message) when it runs
    out of memory."""
    try:
        memory = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        return 0, 0, str(e).strip().splitlines()[0][:240]
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes), int(memory.temp_size_in_bytes), ""


def compile_serve_programs(cfg: OuroConfig, topology: str, mesh_shape: dict[str, int], *, slots: int,
                           cache_length: int, policy: str = "full", prefill_chunk_size: int = 512,
                           depth: int | None = None, compact: bool = True,
                           programs: tuple[str, ...] | None = None) -> list[ServeReport]:
    """Compiles the serving programs (those named in `programs` by prefix, default all) for `topology`: a
    report each (one that XLA refuses for memory says so)."""
    devices = topology_devices(topology)
    mesh = shd.make_mesh(mesh_shape, devices)
    setup = slot_setup(cfg, policy, depth or cfg.total_ut_steps, slots, cache_length, compact, mesh)
    reports = []
    for name, lowered in _programs(setup, prefill_chunk_size):
        if programs is not None and not name.startswith(programs):
            continue
        used, temp, refused = _compiled_bytes(lowered)
        reports.append(ServeReport(name, topology, dict(mesh.shape), slots, cache_length, policy, used,
                                   HBM_BYTES[topology.split(":")[0]], refused, temp))
    return reports


@dataclasses.dataclass(frozen=True)
class ServeMemory:
    """Bytes a server holds on one device (no mesh): weights, the slots' KV cache, the prefill scratch."""

    weights: int
    cache: int
    scratch: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.scratch

    def __str__(self) -> str:
        return (f"weights {format_bytes(self.weights)} + KV cache {format_bytes(self.cache)} + prefill scratch "
                f"{format_bytes(self.scratch)} = {format_bytes(self.total)} (arithmetic, not compiled; "
                "activations and compiler temporaries come on top)")


def serve_memory(cfg: OuroConfig, *, slots: int, cache_length: int, policy: str = "full",
                 depth: int | None = None) -> ServeMemory:
    """The arithmetic of `compile_serve_programs`'s setup: its abstract weights and cache shapes."""
    depth = depth or cfg.total_ut_steps
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nn.unbox(abstract_params(cfg))))
    return ServeMemory(int(weights), cache_bytes(cfg, policy, depth, slots, cache_length),
                       cache_bytes(cfg, "full", depth, 1, cache_length))
