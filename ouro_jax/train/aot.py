"""Ahead-of-time compilation of the real train step for TPU topologies, on a machine without a TPU.

    ouro-aot --config configs/ouro_1p4b.py --topology v5p:2x2x1 --batch_per_chip 2
    ouro-aot --config configs/ouro_1p4b.py --topology v6e:2x2 --find_max_batch
    ouro-aot --config configs/ouro_1p4b.py --topology v5p:2x2x1 --config.mesh.slices=2   # 2 x v5p-8 over DCN

libtpu (`pip install "jax[tpu]"`) describes the topology (`mesh.slices` copies of it); XLA compiles the
sharded train step for it and reports the memory each chip needs, whether it fits the chip's HBM, and the
collectives: those within a slice (ICI) and, listed apart, those across slices (DCN). A compiled multislice
TPU program is one slice's program whose DCN collectives are host transfers to the megascale runtime; a
program over all devices (e.g. CPU) shows them as collectives whose device groups span slices.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import numpy as np

from ouro_jax import sharding as shd
from ouro_jax.train.step import build_train_program

HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: str
    chips: int                 # all slices together
    global_batch: int
    seq_len: int
    bytes_per_chip: int        # arguments + outputs - donated aliases + temporaries
    hbm_bytes: int
    collectives: dict[str, int]  # op -> count within a slice (ICI) in the compiled program
    collectives_in_loops: dict[str, int]  # op -> count inside while loops (run once per trip)
    slices: int = 1
    dcn_collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # op -> count across slices
    dcn_bytes: int = 0         # per chip, sent across slices (loop bodies counted once)

    @property
    def fits(self) -> bool:
        return self.bytes_per_chip <= self.hbm_bytes

    def __str__(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"
        ops = ", ".join(f"{k} x{v} ({self.collectives_in_loops[k]} in loops)" for k, v in self.collectives.items() if v)
        where = f"{self.slices} x {self.topology}" if self.slices > 1 else self.topology
        text = (f"{where}: {self.chips} chips, global batch {self.global_batch} x {self.seq_len} tokens, "
                f"{gib(self.bytes_per_chip)} per chip of {gib(self.hbm_bytes)} HBM -> "
                f"{'fits' if self.fits else 'DOES NOT FIT'}; collectives: {ops or 'none'}")
        if self.slices > 1:
            dcn = ", ".join(f"{k} x{v}" for k, v in self.dcn_collectives.items() if v)
            text += f"; across slices (DCN): {dcn or 'none'}, {self.dcn_bytes / 2**20:.1f} MiB per chip"
        return text


def _host_bounds(generation: str, topology: str) -> tuple[int, int, int]:
    """Chips per host: 2x4 for a v5e / v6e host of 8 chips (v6e-8), 2x2x1 otherwise (v4, v5p, v6e-4)."""
    dims = [int(d) for d in topology.split(":")[1].split("x")]
    if generation in ("v5e", "v6e") and len(dims) >= 2 and dims[0] % 2 == 0 and dims[1] % 4 == 0:
        return (2, 4, 1)
    return (2, 2, 1)


def topology_devices(topology: str, slices: int = 1):
    """Abstract devices of `slices` copies of a TPU topology such as 'v5p:2x2x1', 'v6e:2x4' or 'v5p:4x4x4'
    (with slices > 1 each device has a `slice_index`; the slices are joined by the data-center network)."""
    from jax.experimental import topologies

    # Compile-only use of libtpu: let several processes (parallel tests, two AOT runs) load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    generation = topology.split(":")[0]
    if generation not in HBM_BYTES:
        raise ValueError(f"unknown TPU generation {generation!r} in {topology!r}; known: {sorted(HBM_BYTES)}")
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=_host_bounds(generation, topology), num_slices=slices)
    return desc.devices


def _loop_depths(hlo_text: str) -> dict[str, list[str]]:
    """Each computation's instructions, keyed by (while-loop nesting depth, name): the ENTRY is depth 0,
    a while body one deeper than its caller; fusions and other callees keep their caller's depth."""
    computations, current, entry = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$", line.rstrip())
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current:
            computations[current].append(line)
    depth: dict[str, int] = {}
    stack = [(entry, 0)]
    while stack:
        name, d = stack.pop()
        if name not in computations or depth.get(name, -1) >= d:
            continue
        depth[name] = d
        for line in computations[name]:
            for kind, callee in re.findall(r"(body|condition|calls|to_apply)=%?([\w.\-]+)", line):
                stack.append((callee, d + (kind == "body")))
    return {(depth.get(name, 0), name): lines for name, lines in computations.items()}


_COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
                         r"(?:-start)?\((.*)$")
_DCN_SEND = re.compile(r"= \((.*?)\) send\(.*xla_megascale_runtime.*_xla_megascale_transfer_type=\"(\w+)\"")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    bytes: int      # the largest array of its result (a DCN transfer: the array sent)
    in_loop: bool   # inside a while loop (runs once per trip)
    dcn: bool       # across slices


def _array_bytes(text: str) -> list[int]:
    return [_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(text)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def device_groups(attributes: str, devices: int | None = None) -> list[list[int]] | None:
    """The device groups of a collective from its `replica_groups` or `source_target_pairs`: explicit
    ({{0,1},{2,3}}), iota ([2,2]<=[4], [2,2]<=[2,2]T(1,0)) or empty (all `devices`); None if absent."""
    listed = re.search(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}", attributes)
    if listed and listed.group(1):
        return [_ints(g) for g in re.findall(r"\{([\d,]*)\}", listed.group(1))]
    if listed:
        return [list(range(devices))] if devices else None
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attributes)
    if not iota:
        return None
    dims = _ints(iota.group(2))
    ids = np.arange(math.prod(dims)).reshape(dims).transpose(_ints(iota.group(3)) if iota.group(3) else None)
    return ids.reshape(_ints(iota.group(1))).tolist()


def collectives(hlo_text: str, slice_size: int | None = None, devices: int | None = None) -> list[Collective]:
    """The collectives of a compiled program. Across slices (DCN): megascale host transfers, and with
    `slice_size` (devices per slice, slices in consecutive device ids) those whose groups span slices."""
    found = []
    for (depth, _), lines in _loop_depths(hlo_text).items():
        for line in lines:
            if match := _COLLECTIVE.search(line):
                result, op, attributes = match.groups()
                groups = device_groups(attributes, devices) if slice_size else None
                dcn = any(len({d // slice_size for d in g}) > 1 for g in groups or ())
                found.append(Collective(op, max(_array_bytes(result), default=0), depth > 0, dcn))
            elif match := _DCN_SEND.search(line):
                op = match.group(2).lower().replace("_", "-")
                found.append(Collective(op, _array_bytes(match.group(1))[0], depth > 0, True))
    return found


def _count_collectives(ops: list[Collective]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(count of each ICI collective, of those inside a while loop, of each DCN collective)."""
    total, in_loops, dcn = dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(COLLECTIVES, 0), {}
    for c in ops:
        if c.dcn:
            dcn[c.op] = dcn.get(c.op, 0) + 1
        else:
            total[c.op] += 1
            in_loops[c.op] += c.in_loop
    return total, in_loops, dcn


class DoesNotFit(RuntimeError):
    """XLA refused the program: it needs more memory per chip than the chip has."""


def _needs(message: str) -> str:
    """'X GiB of Y' from XLA's out-of-memory message (or the message's first line)."""
    used = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
    if used:
        return f"{used.group(1)}{used.group(2) or ''} of {used.group(3)}{used.group(4) or ''}"
    return message.strip().splitlines()[0][:200]


def compile_program(config, topology: str, batch_per_chip: int):
    """(compiled train step, the config with its batch set) of `config` for `topology`; raises
    `DoesNotFit` when the compiler runs out of memory."""
    devices = topology_devices(topology, int(config.mesh.get("slices", 1)))
    config = config.copy_and_resolve_references()
    config.data.batch_size = batch_per_chip * len(devices) * int(config.train.grad_accum)
    mesh = shd.make_mesh(dict(config.mesh), devices)
    program = build_train_program(config, mesh)
    try:
        return program.step.lower(program.abstract_state, program.abstract_batch).compile(), config
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        raise DoesNotFit(f"{topology}: batch {batch_per_chip} per chip x {config.data.seq_len} tokens "
                         f"does not fit: needs {_needs(str(e))} HBM") from None


def compile_train_step(config, topology: str, batch_per_chip: int) -> CompileReport:
    """Compiles the train step of `config` for `topology` (`config.mesh.slices` of them) with `batch_per_chip`
    sequences per chip; raises `DoesNotFit` when the compiler runs out of memory."""
    compiled, config = compile_program(config, topology, batch_per_chip)
    memory = compiled.memory_analysis()
    per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes)
    slices = int(config.mesh.get("slices", 1))
    chips = len(topology_devices(topology, slices))
    ops = collectives(compiled.as_text(), chips // slices, chips)
    total, in_loops, dcn = _count_collectives(ops)
    return CompileReport(topology=topology, chips=chips, global_batch=config.data.batch_size,
                         seq_len=int(config.data.seq_len), bytes_per_chip=int(per_chip),
                         hbm_bytes=HBM_BYTES[topology.split(":")[0]], collectives=total, collectives_in_loops=in_loops,
                         slices=slices, dcn_collectives=dcn, dcn_bytes=sum(c.bytes for c in ops if c.dcn))


def max_batch_per_chip(config, topology: str, limit: int = 1024) -> tuple[int, list[CompileReport]]:
    """The largest per-chip batch whose train step fits in HBM.

    Memory grows linearly in the batch: two compiles give the slope, the extrapolated batch is
    compiled, then the search steps down (or up) until the boundary is confirmed by compiles.
    """
    reports: dict[int, CompileReport] = {}

    def fits(batch: int) -> bool:
        if batch not in reports:
            try:
                reports[batch] = compile_train_step(config, topology, batch)
            except DoesNotFit as e:
                print(e, flush=True)
                return False
            print(reports[batch], flush=True)
        return reports[batch].fits

    if not fits(1):
        return 0, list(reports.values())
    if not fits(2):
        return 1, list(reports.values())
    per_sequence = max(reports[2].bytes_per_chip - reports[1].bytes_per_chip, 1)
    fixed = reports[1].bytes_per_chip - per_sequence
    guess = int(min(max((reports[1].hbm_bytes - fixed) // per_sequence, 2), limit))
    while guess > 2 and not fits(guess):
        guess -= 1
    while guess < limit and fits(guess + 1):
        guess += 1
    return guess, list(reports.values())
