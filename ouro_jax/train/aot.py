"""Ahead-of-time compilation of the real train step for TPU topologies, on a machine without a TPU.

    ouro-aot --config configs/ouro_1p4b.py --topology v5p:2x2x1 --batch_per_chip 2
    ouro-aot --config configs/ouro_1p4b.py --topology v6e:2x2 --find_max_batch

libtpu (`pip install "jax[tpu]"`) describes the topology; XLA compiles the sharded train step for
it and reports the memory each chip needs, whether it fits the chip's HBM, and the collectives.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

from ouro_jax import sharding as shd
from ouro_jax.train.step import build_train_program

HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: str
    chips: int
    global_batch: int
    seq_len: int
    bytes_per_chip: int        # arguments + outputs - donated aliases + temporaries
    hbm_bytes: int
    collectives: dict[str, int]  # op -> count in the compiled program
    collectives_in_loops: dict[str, int]  # op -> count inside while loops (run once per trip)

    @property
    def fits(self) -> bool:
        return self.bytes_per_chip <= self.hbm_bytes

    def __str__(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"
        ops = ", ".join(f"{k} x{v} ({self.collectives_in_loops[k]} in loops)" for k, v in self.collectives.items() if v)
        return (f"{self.topology}: {self.chips} chips, global batch {self.global_batch} x {self.seq_len} tokens, "
                f"{gib(self.bytes_per_chip)} per chip of {gib(self.hbm_bytes)} HBM -> "
                f"{'fits' if self.fits else 'DOES NOT FIT'}; collectives: {ops or 'none'}")


def topology_devices(topology: str):
    """Abstract devices of a TPU topology such as 'v5p:2x2x1', 'v6e:2x2' or 'v5p:4x4x4'."""
    from jax.experimental import topologies

    # Compile-only use of libtpu: let several processes (parallel tests, two AOT runs) load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    generation = topology.split(":")[0]
    if generation not in HBM_BYTES:
        raise ValueError(f"unknown TPU generation {generation!r} in {topology!r}; known: {sorted(HBM_BYTES)}")
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
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


def _count_collectives(hlo_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """(count of each collective op, count of those inside a while loop) in a compiled program."""
    total, in_loops = dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(COLLECTIVES, 0)
    for (depth, _), lines in _loop_depths(hlo_text).items():
        for line in lines:
            for op in COLLECTIVES:
                if re.search(rf"= \S+ {op}(-start)?\(", line):
                    total[op] += 1
                    in_loops[op] += depth > 0
    return total, in_loops


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
    devices = topology_devices(topology)
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
    """Compiles the train step of `config` for `topology` with `batch_per_chip` sequences per chip;
    raises `DoesNotFit` when the compiler runs out of memory."""
    compiled, config = compile_program(config, topology, batch_per_chip)
    memory = compiled.memory_analysis()
    per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes)
    collectives, in_loops = _count_collectives(compiled.as_text())
    return CompileReport(topology=topology, chips=len(topology_devices(topology)), global_batch=config.data.batch_size,
                         seq_len=int(config.data.seq_len), bytes_per_chip=int(per_chip),
                         hbm_bytes=HBM_BYTES[topology.split(":")[0]], collectives=collectives,
                         collectives_in_loops=in_loops)


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
