"""A roofline ESTIMATE of the train step's time and MFU on a TPU topology, from XLA's cost analysis.

XLA's cost analysis counts a while-loop body once, not once per trip (the T recurrent steps and the N
layers are scans), and sees nothing inside Pallas custom calls. So the cost of the real config is fitted
from four compiles of the same model, width and batch with T, N in {1, 2}, fully unrolled (no loops), XLA
attention and cross-entropy and one CE chunk: every cost the step has (FLOPs, bytes accessed, collective
bytes) is a + b*T + c*N + d*T*N (d: a layer at a step, b: the per-step head and gate, c: per-layer work
outside the steps, a: the rest), solved exactly from the four and evaluated at the config's T and N.
Checked against a direct loop-free compile at T = N = 3: FLOPs within 3%, bytes and collective bytes
within 10% (XLA fuses a larger program somewhat differently).

The step-time estimate is the roofline max(FLOPs / peak, bytes / HBM bandwidth, collective bytes / ICI
bandwidth, DCN bytes / DCN bandwidth) per chip: perfect overlap, no launch or scheduling gaps, so a lower
bound on the time and an upper bound on the MFU. Across slices (`mesh.slices` > 1) the bytes each chip
sends over the data-center network are timed apart, at the chip's share of its host's DCN bandwidth.
MFU counts model FLOPs (`metrics.model_flops_per_token`), not rematerialized ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ouro_jax.train.aot import collectives, compile_program, topology_devices
from ouro_jax.train.config import model_config
from ouro_jax.train.metrics import model_flops_per_token


@dataclasses.dataclass(frozen=True)
class ChipPeak:
    flops: float      # dense bf16 FLOP/s
    hbm: float        # HBM bytes/s
    ici: float        # inter-chip interconnect bytes/s (all links together)
    dcn: float | None = None  # data-center network bytes/s per chip (its share of the host's NICs)


# Public per-chip figures (Cloud TPU system architecture pages). DCN, an ESTIMATE of what one chip gets:
# v5p 50 Gbps per chip (the v5p page's DCN row); v6e 4 x 200 Gbps NICs per 8-chip host = 100 Gbps per chip;
# v5e 2 x 100 Gbps per 8-chip host = 25 Gbps per chip; v4: no published figure.
CHIP_PEAKS = {
    "v4": ChipPeak(275e12, 1228e9, 300e9),
    "v5e": ChipPeak(197e12, 819e9, 200e9, 25e9 / 8),
    "v5p": ChipPeak(459e12, 2765e9, 600e9, 50e9 / 8),
    "v6e": ChipPeak(918e12, 1640e9, 448e9, 100e9 / 8),
}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per chip, for one train step."""

    flops: float
    bytes: float
    collective_bytes: float  # within a slice (ICI)
    dcn_bytes: float = 0.0   # sent across slices

    def as_array(self) -> np.ndarray:
        return np.array([self.flops, self.bytes, self.collective_bytes, self.dcn_bytes], np.float64)


def collective_bytes(hlo_text: str, slice_size: int | None = None, devices: int | None = None) -> tuple[float, float]:
    """(ICI, DCN) bytes moved by the collectives of a compiled program (`aot.collectives`): each op's largest
    result array, counted once per op (loops are not expanded: use it on loop-free programs)."""
    ops = collectives(hlo_text, slice_size, devices)
    return float(sum(c.bytes for c in ops if not c.dcn)), float(sum(c.bytes for c in ops if c.dcn))


def program_cost(compiled) -> Cost:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return Cost(float(analysis["flops"]), float(analysis["bytes accessed"]), *collective_bytes(compiled.as_text()))


def unrolled_variant(config, steps: int, layers: int):
    """`config` with T=`steps`, N=`layers`, loops unrolled, XLA attention / CE in one chunk (loop-free)."""
    c = config.copy_and_resolve_references()
    c.model.total_ut_steps, c.model.num_hidden_layers = steps, layers
    c.execution.update(unroll=True, attention_impl="xla", cross_entropy_impl="xla")
    c.train.ce_chunk_size = int(c.data.seq_len)
    return c


def fitted_cost(config, topology: str, batch_per_chip: int) -> Cost:
    """The step's per-chip cost at the config's T and N, fitted from four loop-free compiles (module doc)."""
    costs = {(t, n): program_cost(compile_program(unrolled_variant(config, t, n), topology, batch_per_chip)[0])
             .as_array() for t in (1, 2) for n in (1, 2)}
    d = costs[2, 2] - costs[2, 1] - costs[1, 2] + costs[1, 1]
    b = costs[2, 1] - costs[1, 1] - d
    c = costs[1, 2] - costs[1, 1] - d
    a = costs[1, 1] - b - c - d
    steps, layers = int(config.model.total_ut_steps), int(config.model.num_hidden_layers)
    return Cost(*(a + b * steps + c * layers + d * steps * layers))


@dataclasses.dataclass(frozen=True)
class Roofline:
    topology: str
    chips: int
    tokens_per_chip: int
    cost: Cost
    model_flops: float  # per chip, per step
    peak: ChipPeak

    @property
    def times(self) -> dict[str, float]:
        times = {"compute": self.cost.flops / self.peak.flops, "memory": self.cost.bytes / self.peak.hbm,
                 "collectives": self.cost.collective_bytes / self.peak.ici}
        if self.cost.dcn_bytes:
            if self.peak.dcn is None:
                raise ValueError(f"{self.topology}: no published DCN bandwidth to time the cross-slice collectives")
            times["dcn"] = self.cost.dcn_bytes / self.peak.dcn
        return times

    @property
    def step_seconds(self) -> float:
        return max(self.times.values())

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_seconds / self.peak.flops

    def __str__(self) -> str:
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.times.items())
        bound = max(self.times, key=self.times.get)
        return (f"ESTIMATE (roofline from XLA cost analysis, loops fitted from unrolled compiles) {self.topology}: "
                f"{self.tokens_per_chip} tokens/chip/step, per chip {self.cost.flops / 1e12:.1f} TFLOP "
                f"({self.model_flops / 1e12:.1f} model), {self.cost.bytes / 2**30:.1f} GiB accessed, "
                f"{self.cost.collective_bytes / 2**30:.2f} GiB collectives"
                + (f", {self.cost.dcn_bytes / 2**20:.1f} MiB across slices" if self.cost.dcn_bytes else "")
                + f" -> {times}: {bound}-bound, "
                f"step >= {self.step_seconds * 1e3:.0f} ms, MFU <= {self.mfu:.1%}")


def roofline(config, topology: str, batch_per_chip: int) -> Roofline:
    """The roofline estimate of `config`'s train step on `topology` with `batch_per_chip` sequences per chip."""
    generation = topology.split(":")[0]
    slices = int(config.mesh.get("slices", 1))
    chips = len(topology_devices(topology, slices))
    seq_len = int(config.data.seq_len)
    tokens = batch_per_chip * seq_len * int(config.train.grad_accum)
    flops_per_token = model_flops_per_token(model_config(config), seq_len,
                                            stage=2 if config.loss.objective == "stage2" else 1)
    return Roofline(topology=f"{slices} x {topology}" if slices > 1 else topology, chips=chips, tokens_per_chip=tokens,
                    cost=fitted_cost(config, topology, batch_per_chip), model_flops=flops_per_token * tokens,
                    peak=CHIP_PEAKS[generation])
