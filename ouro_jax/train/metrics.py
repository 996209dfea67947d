"""Training metrics: analytic model FLOPs, peak FLOP/s per device (MFU), and the metric writers.

MFU = model FLOPs per second / peak FLOP/s of the devices. Model FLOPs are counted analytically
(XLA's cost analysis counts a scan body once, not once per trip): every matmul of the T loops,
the LM head at every step (the per-step loss needs it), attention scores, 3x for forward + backward,
no rematerialization. Peak FLOP/s: a table of dense bf16 peaks per accelerator chip, and on CPU
a measured matmul (the whole host, however many fake devices it is split into).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ouro_jax import paths
from ouro_jax.config import OuroConfig
from ouro_jax.errors import ConfigError, one_line
from ouro_jax.train.background import BackgroundWriter

# Dense bf16 peak FLOP/s per chip, by a substring of `device.device_kind` (first match wins).
PEAK_FLOPS_PER_CHIP = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12),
)


def matmul_flops_per_token(cfg: OuroConfig) -> int:
    """Forward FLOPs per token of one recurrent step's weight matmuls (layers + LM head)."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    attn = d * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_layer = attn + 3 * d * f
    return 2 * (n * per_layer + d * cfg.vocab_size + d)


def model_flops_per_token(cfg: OuroConfig, seq_len: int, *, stage: int = 1, num_steps: int | None = None) -> float:
    """Training FLOPs per token: T x (weight matmuls + attention) x 3 for Stage I (forward and backward).

    Attention counts QK^T and PV over the full `seq_len` (the PaLM convention, no causal halving).
    Stage II back-propagates into the gate only: forward FLOPs plus a negligible backward.
    """
    steps = cfg.total_ut_steps if num_steps is None else num_steps
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    forward = steps * (matmul_flops_per_token(cfg) + attention)
    return float(3 * forward if stage == 1 else forward)


_CPU_PEAK: dict[str, float] = {}


def measure_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a square matmul on the default device (best of `repeats`), bf16 with f32 accumulation."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dt)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(devices=None, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together, where the number comes from)."""
    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        if dtype not in _CPU_PEAK:
            _CPU_PEAK[dtype] = measure_matmul_flops(dtype)
        return _CPU_PEAK[dtype], f"measured {dtype} matmul on this CPU"
    for key, flops in PEAK_FLOPS_PER_CHIP:
        if key in kind:
            return flops * len(devices), f"{len(devices)} x {devices[0].device_kind} bf16 peak"
    return math.nan, f"unknown peak for {devices[0].device_kind!r}"


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars as they are; per-step vectors [T] as `name/step_1..T`."""
    flat = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            flat[name] = float(value)
        else:
            flat.update({f"{name}/step_{i + 1}": float(v) for i, v in enumerate(value.reshape(-1))})
    return flat


class ObjectStoreLog:
    """A file that grows, on an object store (which cannot append in place). `write` only buffers; a
    background thread appends what was written as one piece every `interval` seconds, on `sync()` and on
    `close()` (which waits for it): on `gs://` the piece is uploaded and composed onto the object, so no
    upload ever repeats what is stored (every `REWRITE_EVERY` pieces the object is rewritten once, to keep
    its component count in GCS's limits). Other stores get the object rewritten whole at each append.
    A failed append is reported on stderr and retried with the next one."""

    REWRITE_EVERY = 1000

    def __init__(self, path: paths.PathLike, interval: float = 60.0):
        self.path, self.interval = paths.as_path(path), interval
        self._pending = bytearray()
        self._lock, self._wake, self._closed = threading.Lock(), threading.Event(), False
        self._pieces = 0
        self._thread = threading.Thread(target=self._run, name=f"append-{self.path.name}", daemon=True)
        self._thread.start()

    def write(self, data: str | bytes) -> None:
        with self._lock:
            self._pending += data.encode() if isinstance(data, str) else data

    def flush(self) -> None:
        """Nothing: the background thread appends every `interval` seconds."""

    def sync(self) -> None:
        """Asks for an append now, without waiting for it."""
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self._wake.clear()
            self._append()
        self._append()

    def _append(self) -> None:
        with self._lock:
            piece, self._pending = bytes(self._pending), bytearray()
        if not piece:
            return
        try:
            self._store(piece)
        except Exception as e:  # noqa: BLE001 -- a network fault must not end the run; the rows are kept
            print(f"[metrics] appending to {self.path} failed ({type(e).__name__}: {e}); retrying later",
                  file=sys.stderr, flush=True)
            with self._lock:
                self._pending[:0] = piece

    def _store(self, piece: bytes) -> None:
        scheme, _, name = os.fspath(self.path).partition("://")
        exists = self.path.exists()
        if scheme != "gs" or not exists or self._pieces >= self.REWRITE_EVERY:
            old = self.path.read_bytes() if exists else b""
            paths.write_atomic(self.path, old + piece)
            self._pieces = 0
            return
        import gcsfs

        fs = gcsfs.GCSFileSystem()
        part = f"{name}.piece-{os.getpid()}"
        fs.pipe(part, piece)
        fs.merge(name, [name, part])
        fs.rm(part)
        self._pieces += 1


class _ObjectStoreEvents:
    """tensorboardX writer factory for object-store logdirs: event files through etils.epath."""

    def open(self, path: str) -> ObjectStoreLog:
        return ObjectStoreLog(path)

    def directory_check(self, path: str) -> None:
        del path  # object stores have no directories to create


def _tensorboardx():
    """(SummaryWriter, register_writer_factory), imported without torch: tensorboardX's writer imports torch
    when it is installed (~2 s of every run's start) only to accept torch tensors; we log floats."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
        from tensorboardX.record_writer import register_writer_factory
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter, register_writer_factory


class MetricsWriter:
    """Every step to `metrics.jsonl` and TensorBoard (`tb/`) in the workdir; a progress bar and a
    line every `log_every` steps on stdout. Only process 0 writes. On an object store (`gs://`)
    metrics.jsonl and the events are appended by a background thread (`ObjectStoreLog`) every minute,
    after each checkpoint and at the end: the training thread never waits on the network."""

    def __init__(self, workdir: paths.PathLike, *, total_steps: int, log_every: int = 10, progress_bar: bool = True,
                 initial_step: int = 0, wandb_project: str = "", run_config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.log_every = max(1, int(log_every))
        self._jsonl = self._tb = self._bar = self._wandb = None
        if not self.enabled:
            return
        if wandb_project:
            self._wandb = open_wandb(wandb_project, workdir, run_config or {})
        workdir = paths.as_path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        jsonl = workdir / "metrics.jsonl"
        resumed = jsonl.exists()
        if resumed:
            drop_rows_after(jsonl, initial_step)
        self._jsonl = jsonl.open("a") if paths.is_local(jsonl) else ObjectStoreLog(jsonl, interval=60.0)
        SummaryWriter, register_writer_factory = _tensorboardx()
        if not paths.is_local(workdir):  # the same credentials as every other file (not tensorboardX's own)
            register_writer_factory(os.fspath(workdir).split("://", 1)[0], _ObjectStoreEvents())

        # purge_step makes TensorBoard discard the events of the previous run from that step on
        try:
            self._tb = SummaryWriter(str(workdir / "tb"), purge_step=initial_step + 1 if resumed else None)
        except OSError as e:  # it writes its first event at once
            raise OSError(f"{workdir / 'tb'}: cannot start the TensorBoard writer ({one_line(e)})") from None
        self._tb_thread = BackgroundWriter(os.fspath(workdir / "tb"), "TensorBoard writer")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stdout, mininterval=1.0)

    def write(self, step: int, metrics: dict[str, Any], *, kind: str = "train") -> None:
        if not self.enabled:
            return
        flat = flatten_metrics(metrics)
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **flat}) + "\n")
        self._jsonl.flush()
        self._tb_thread.submit(_add_scalars, self._tb, kind, flat, step)
        if self._wandb is not None:  # queued to wandb's own process: no wait here
            self._wandb.log({f"{kind}/{name}": value for name, value in flat.items()}, step=step)
        if kind == "train" and self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{flat['loss']:.4f}", refresh=False)
        if kind != "train" or step % self.log_every == 0:
            self.log(f"{kind} step {step}: " + summary_line(metrics))

    def sync(self) -> None:
        """Makes the metrics written so far durable (on an object store: uploads them)."""
        if isinstance(self._jsonl, ObjectStoreLog):
            self._jsonl.sync()

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        try:
            if self._tb is not None:
                self._tb_thread.close(self._tb.close)
        except OSError:
            _abandon(self._tb)
            raise
        finally:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._wandb is not None:
                self._wandb.finish()


def _abandon(tb) -> None:
    """Lets the process exit past a tensorboardX writer whose thread died or hangs: its atexit close and
    its queue's exit-time join would otherwise wait forever."""
    events = getattr(getattr(tb, "file_writer", None), "event_writer", None)
    if events is not None:
        events._closed = True  # add_event / flush / close (its atexit hook) become no-ops
        if getattr(events, "_event_queue", None) is not None:
            events._event_queue.cancel_join_thread()


def _add_scalars(tb, kind: str, flat: dict[str, float], step: int) -> None:
    for name, value in flat.items():
        tb.add_scalar(f"{kind}/{name}", value, step)


def open_wandb(project: str, workdir: paths.PathLike, run_config: dict):
    """A Weights & Biases run for `workdir` (its id comes from the workdir, so a resumed run continues it).
    wandb is optional (`pip install 'ouro_jax[wandb]'`); WANDB_MODE=offline logs locally."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb_project needs Weights & Biases, which is not installed: "
                          "pip install 'ouro_jax[wandb]' (or leave train.wandb_project empty)") from None
    workdir = os.fspath(paths.as_path(workdir))
    local = paths.cache_dir() / "wandb"
    local.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, id=hashlib.sha256(workdir.encode()).hexdigest()[:16], resume="allow",
                      name=os.path.basename(workdir), dir=os.fspath(local), config=run_config)


def drop_rows_after(path: paths.PathLike, step: int) -> int:
    """Rewrites the JSONL metrics file at `path` without the rows after `step` (a resumed run logs
    them again); returns how many were dropped. Unparseable (torn) lines are dropped too."""
    lines = io.StringIO(paths.as_path(path).read_text()).readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(kept) < len(lines):
        paths.write_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def summary_line(metrics: dict[str, Any]) -> str:
    """A compact one-line summary: scalars with 4 significant digits, per-step vectors in brackets."""
    parts = []
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            parts.append(f"{name}={float(value):.4g}")
        else:
            parts.append(f"{name}=[" + " ".join(f"{float(v):.3f}" for v in value.reshape(-1)) + "]")
    return " ".join(parts)
