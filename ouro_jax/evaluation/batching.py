"""Batch sizes chosen by memory, and data parallelism over this process's devices, for the lm-eval backend.

`auto_batch_size` fits the largest power-of-two batch per device whose estimated peak (activations and
per-step logits of a scoring pass, or the KV cache of generation) stays within a fraction of the free
memory of the smallest device; `DataParallel` holds one replica of the parameters per device and runs
work on all of them at once (scoring: one program over a batch sharded on a `data` mesh axis;
generation: one thread per device, each driving its own replica).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ouro_jax.config import OuroConfig
from ouro_jax.inference import cache_bytes

MAX_AUTO_BATCH = 256  # per device


def free_bytes(device: jax.Device) -> int:
    """Memory free on `device`: its allocator's limit minus what is in use; host RAM for CPU devices."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def scoring_row_bytes(cfg: OuroConfig, length: int, depth: int) -> int:
    """Estimated peak bytes of one row of a scoring pass: the float32 logits of every step plus their
    log-softmax, and the hidden states kept per step and layer."""
    logits = (depth + 2) * length * cfg.vocab_size * 4
    hidden = depth * (cfg.num_hidden_layers + 2) * length * cfg.hidden_size * 4 * 4
    return logits + hidden


def generation_row_bytes(cfg: OuroConfig, policy: str, depth: int, length: int) -> int:
    """Estimated peak bytes of one row of generation: its KV cache and the prefill of the prompt."""
    return cache_bytes(cfg, policy, depth, 1, length) + scoring_row_bytes(cfg, length, 1)


def auto_batch_size(row_bytes: int, devices: Sequence[jax.Device], params_bytes: int, fraction: float = 0.5,
                    cap: int = MAX_AUTO_BATCH) -> int:
    """The largest power of two b <= cap with b * row_bytes <= fraction * (free - params) on every device,
    times the number of devices (at least one row per device)."""
    budget = fraction * (min(free_bytes(d) for d in devices) - params_bytes)
    per_device = 1
    while per_device * 2 <= cap and per_device * 2 * row_bytes <= budget:
        per_device *= 2
    return per_device * len(devices)


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _shard_on(array: jax.Array, device: jax.Device) -> jax.Array:
    return next(shard.data for shard in array.addressable_shards if shard.device == device)


class DataParallel:
    """One replica of `params` per device of `devices`."""

    def __init__(self, params: Any, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        self.mesh = Mesh(np.asarray(self.devices), ("data",))
        self.replicated = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        # each device's replica as a plain single-device tree: views of the replicated buffers, no second copy
        self.replicas = [jax.tree.map(lambda x, d=d: _shard_on(x, d), self.replicated) for d in self.devices]

    def shard_rows(self, *arrays: np.ndarray) -> list[jax.Array]:
        """Host arrays [B, ...] split over the devices along B (B a multiple of the device count)."""
        sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        return [jax.device_put(a, sharding) for a in arrays]

    def map(self, work: Callable[[Any, Any], Any], chunks: Sequence[Any]) -> list[Any]:
        """`work(params_replica, chunk)` for each chunk: chunk i on device i % n, one thread per device."""
        n = len(self.devices)
        if n == 1:
            return [work(self.replicas[0], chunk) for chunk in chunks]

        def on_device(d: int) -> list[Any]:
            with jax.default_device(self.devices[d]):
                return [work(self.replicas[d], chunk) for chunk in chunks[d::n]]

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            per_device = list(pool.map(on_device, range(n)))
        return [per_device[i % n][i // n] for i in range(len(chunks))]
