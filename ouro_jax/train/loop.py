"""The training loop: `train(config, workdir)` runs or resumes a run (CLI: `ouro_jax.cli.train`).

WORKDIR gets `checkpoints/` (orbax: train state + data iterator, async, newest K kept),
`metrics.jsonl` and `tb/` (every step), and `params/` (a params-only export for inference) at the
end. Re-running the same command resumes from the newest restorable checkpoint and continues
bit-for-bit (metrics after that step are dropped); checkpoints that do not fit the config stop the run
(`train.restart_incompatible=True` moves the old run aside and starts over). One run per workdir (a
lock). SIGTERM / SIGINT save a checkpoint and exit (status 128 + signal). Non-finite losses, gradients
or updated parameters skip the update; `train.max_consecutive_nonfinite` in a row stop the run.

The host never waits for the device every step: metrics stay on the device (copied to the host
asynchronously) and are fetched and written, one row per step, every `train.log_every` steps and
before each checkpoint and evaluation; `tokens_per_s` / `mfu` are the averages of that window. The
non-finite limit is checked at that cadence (a skipped update leaves the state unchanged, so a late
check only wastes steps). On several processes the stop signal is agreed every
`train.stop_check_every` steps (one small all-gather), so every process saves the same step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Collection
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ouro_jax import paths
from ouro_jax import sharding as shd
from ouro_jax.config import ARCHITECTURE_FIELDS, OuroConfig
from ouro_jax.data import make_batch_iterator, make_source
from ouro_jax.errors import CheckpointError, ConfigError, OuroError
from ouro_jax.evaluation.training import TaskEvaluation, make_evaluations  # noqa: F401 -- re-exported
from ouro_jax.model_source import resolve_model
from ouro_jax.params_io import load_model, load_model_config, save_params
from ouro_jax.train.checkpointer import TrainCheckpointer, restore_train_state
from ouro_jax.train.config import check_fits, check_starting_point, check_training
from ouro_jax.train.instrument import StepProfiler, compilation_cache, compilation_cache_dir
from ouro_jax.train.metrics import MetricsWriter, model_flops_per_token, peak_flops
from ouro_jax.train.settings import DataSettings, RunSettings
from ouro_jax.train.step import (
    TrainProgram,
    TrainState,
    as_model_batch,
    build_train_program,
    place_params,
    updates_applied,
)
from ouro_jax.train.workdir import RUN_CONFIG, WorkdirLock, check_resume_config, move_run_aside

# Fault injection: `OURO_JAX_FAULT_KILL_AFTER_STEP=N` kills the run (SIGKILL) right after step N, once every
# checkpoint requested so far is finalized: a deterministic crash for the resume tests.
FAULT_KILL_ENV = "OURO_JAX_FAULT_KILL_AFTER_STEP"

class NonFiniteTrainingError(OuroError, RuntimeError):
    """Too many consecutive updates skipped for a non-finite loss or gradient."""


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT arrived; a checkpoint of `step` was saved."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint saved in {checkpoint_dir}; rerun the same command to resume")


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    eval_metrics: dict[str, Any]   # task name -> {"step_ce": [T], "accuracy": [T]} of the final evaluation
    checkpoint_dir: str
    params_dir: str | None


# ---- data -------------------------------------------------------------------------------------

def make_sources(data: DataSettings, model_cfg: OuroConfig) -> list[Any]:
    """The data sources of `data.sources` (';'-separated specs), checked against the vocabulary."""
    specs = data.source_specs
    sources = [make_source(spec) for spec in specs]
    for spec, src in zip(specs, sources):
        if src.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"data source {spec!r} has vocab_size {src.vocab_size} > model.vocab_size "
                             f"{model_cfg.vocab_size}")
    return sources


def make_train_iterator(data: DataSettings, sources: list[Any]):
    """This process's grain iterator of training batches (global batch / process count rows); a step of a
    `data.batch_ramp` batch takes several (`next_batch`), so the iterator never depends on the ramp."""
    count = jax.process_count()
    if data.batch_size % count:
        raise ConfigError(f"data.batch_size ({data.batch_size}) must be divisible by the {count} processes")
    return make_batch_iterator(sources, seq_len=data.seq_len, batch_size=data.batch_size // count,
                               weights=data.mixture_weights, seed=data.seed, num_workers=data.num_workers)


def next_batch(iterator, multiple: int) -> dict[str, np.ndarray]:
    """The rows of one step: `multiple` batches of the iterator, concatenated."""
    chunks = [as_model_batch(next(iterator)) for _ in range(multiple)]
    return chunks[0] if multiple == 1 else {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


# ---- model initialization ---------------------------------------------------------------------

def adopt_checkpoint_shape(run: RunSettings, path: str, explicit: Collection[str] = ()) -> RunSettings:
    """`run` with the architecture fields (`ARCHITECTURE_FIELDS`: the parameter shapes) from the checkpoint at
    `path`. Everything else stays the run config's: the recurrent steps T, RoPE theta, max positions and
    every execution setting, so a stage-1b config (T=4) starts from a stage-1a checkpoint (T=8) at T=4.

    `explicit` names the `config.model` fields set on the command line (`--config.model.K=V`). For T,
    theta and positions an explicit value simply wins. An explicit architecture field cannot change the
    checkpoint's shapes: it must equal the checkpoint's value, else ConfigError (never silently replaced).
    Stage II (`loss.objective="stage2"`) freezes the LM, so it takes every model field from the checkpoint
    (bar explicit ones): the gate must learn on the hidden states the LM was trained to produce.
    """
    stored, model = load_model_config(path).to_dict(), run.model.to_dict()
    adopted = ARCHITECTURE_FIELDS
    if run.loss.objective == "stage2":
        adopted = [k for k in stored if k in ARCHITECTURE_FIELDS or k not in explicit]
    clashes = [f"{k}={model[k]} (checkpoint: {stored[k]})" for k in ARCHITECTURE_FIELDS
               if k in explicit and model[k] != stored[k]]
    if clashes:
        raise ConfigError(f"--config.model overrides disagree with the shapes of init_from {path}: "
                          f"{', '.join(clashes)}; drop them (the checkpoint fixes the architecture)")
    changed = {k: (model[k], stored[k]) for k in adopted if model[k] != stored[k]}
    if changed:
        print(f"[init] model fields taken from {path}: " +
              ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), flush=True)
    return run.replace(model=run.model.replace(**{k: v for k, (_, v) in changed.items()}))


# ---- the loop ---------------------------------------------------------------------------------

class _StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (a second SIGINT aborts).

    On several processes the flags are all-gathered only every `check_every` steps (a collective
    blocks the host until the device catches up), always at the same steps on every process, so they
    agree on the step they save; a signal is acted on within `check_every` steps.
    """

    def __init__(self, check_every: int = 1):
        if check_every < 1:
            raise ValueError(f"train.stop_check_every must be >= 1, got {check_every}")
        self.check_every = check_every
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def requested(self, step: int, *, force: bool = False) -> bool:
        """Whether to stop after `step`: this process's flag, or on several processes the flags of all of
        them, gathered when `step` is a multiple of `check_every` or `force` (call both on every process)."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not force and step % self.check_every:
            return False
        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        self.signum = self.signum or int(np.max(signums)) or None
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[train] {signal.Signals(signum).name} received: saving a checkpoint after this step", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass(frozen=True)
class _Throughput:
    flops_per_token: float
    peak: float         # FLOP/s of all devices
    peak_source: str    # where that number comes from


def _initial_state(run: RunSettings, program: TrainProgram, checkpointer: TrainCheckpointer,
                   data) -> tuple[int, Any, bool]:
    """(step, state, resumed): the newest restorable checkpoint, else `init_from`, else a random init."""
    restored = checkpointer.restore_latest(program.abstract_state, data)
    if restored is not None:
        print(f"[train] resumed from step {restored[0]} ({checkpointer.directory})", flush=True)
        return (*restored, True)
    if run.init_from and run.train.carry_optimizer:
        print(f"[train] initialized from {run.init_from} with its optimizer state", flush=True)
        return 0, carried_state(run, program), False
    if run.init_from:
        _, params = load_model(run.init_from, param_dtype=program.model_cfg.execution.param_dtype)
        print(f"[train] initialized from {run.init_from}", flush=True)
        return 0, place_params(program, params), False
    print(f"[train] no finished checkpoint in {checkpointer.directory}: starting from scratch", flush=True)
    return 0, program.init(jax.random.key(run.seed)), False


def carried_state(run: RunSettings, program: TrainProgram) -> TrainState:
    """The params and optimizer state (AdamW moments, update count) of the newest step of the workdir
    `init_from` names, as step 0 of this run (train.carry_optimizer); refused in one line when that is not a
    training run or its state does not fit this run's (other parameter shapes, another objective)."""
    source = resolve_model(run.init_from)
    if source.kind != "train_step":
        raise ConfigError(f"train.carry_optimizer=True: init_from {run.init_from} holds params only, no optimizer "
                          "state; point it at the previous stage's workdir, or set train.carry_optimizer=False")
    problem, state = restore_train_state(source.path, program.abstract_state)
    if problem:
        raise ConfigError(f"train.carry_optimizer=True: the train state of {source.describe()} does not fit this "
                          f"run ({problem}); AdamW moments carry only where the parameter shapes stay (an upcycled "
                          "model cannot carry them): set train.carry_optimizer=False for a fresh optimizer state")
    count = int(jax.device_get(updates_applied(state.opt_state)))
    if count != run.optim.schedule_offset:
        print(f"[train] the carried optimizer counted {count} updates, optim.schedule_offset is "
              f"{run.optim.schedule_offset}: the schedule goes by the count", flush=True)
    zero = lambda: jax.device_put(np.int32(0), program.state_shardings.step)  # noqa: E731 -- one buffer each: donated
    return state.replace(step=zero(), nonfinite_total=zero(), nonfinite_streak=zero())


def _write_run_config(run: RunSettings, workdir: paths.Path) -> None:
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / RUN_CONFIG).write_text(json.dumps(run.to_dict(), indent=2))


def _fault_kill(checkpointer: TrainCheckpointer) -> None:
    """Fault injection for crash tests: once the pending saves are final, SIGKILL this process."""
    checkpointer.wait()
    os.kill(os.getpid(), signal.SIGKILL)


class _Trainer:
    """One run's pieces (program, data, checkpoints, metrics) and the step loop over them."""

    def __init__(self, run: RunSettings, workdir: paths.Path):
        self.run_settings, self.workdir = run, workdir
        self.profiler = StepProfiler(run.train.profile_steps, workdir)
        self.mesh = shd.make_mesh(dict(run.mesh))
        options = dict(run.train.compiler_options) or None
        self.program = build_train_program(run, self.mesh, options)
        self.ramp_programs = {m: build_train_program(run.at_batch_multiple(m), self.mesh, options)
                              for m in run.data.batch_multiples[1:]}
        self.sources = make_sources(run.data, self.program.model_cfg)
        self.evaluations = make_evaluations(run.data, run.model.vocab_size, self.sources, self.mesh)
        self.checkpoint_dir = workdir / "checkpoints"
        try:
            resumed = self._start()
        except CheckpointError as e:
            if not run.train.restart_incompatible:
                raise
            self.checkpointer.close()
            moved = move_run_aside(workdir) if jax.process_index() == 0 else None
            print(f"[train] {e}\n[train] train.restart_incompatible=True: old run moved to {moved}", flush=True)
            resumed = self._start()
        self.saved_step = self.step if resumed else None
        self.eval_metrics: dict[str, Any] = {}

    def _start(self) -> bool:
        """Opens the checkpoints and sets data, step and state; returns whether a checkpoint was restored."""
        run = self.run_settings
        paths.check_writable(self.checkpoint_dir)
        self.data = make_train_iterator(run.data, self.sources)
        self.checkpointer = TrainCheckpointer(self.checkpoint_dir, save_every=run.train.checkpoint_every,
                                              keep=run.train.keep_checkpoints or None,
                                              async_save=run.train.async_checkpointing)
        if self.checkpointer.all_steps():
            check_resume_config(run.to_dict(), run.train.allowed_changes, self.workdir)
        self.step, self.state, resumed = _initial_state(run, self.program, self.checkpointer, self.data)
        return resumed

    def _compile(self) -> dict[int, Any]:
        """The compiled step of each batch multiple (1 and those of `data.batch_ramp`)."""
        start = time.perf_counter()
        step_fns = {m: program.step.lower(program.abstract_state, program.abstract_batch).compile()
                    for m, program in {1: self.program, **self.ramp_programs}.items()}
        print(f"[train] objective {self.program.objective}, model {model_fields_summary(self.program.model_cfg)}, "
              f"mesh {dict(self.mesh.shape)}, compiled in {time.perf_counter() - start:.1f}s", flush=True)
        return step_fns

    def _evaluate(self, writer: MetricsWriter) -> None:
        for name, evaluation in self.evaluations.items():
            self.eval_metrics[name] = evaluation(self.program, self.state.params)
            writer.write(self.step, self.eval_metrics[name], kind=f"eval/{name}")

    def _check_nonfinite(self, step: int, metrics, writer: MetricsWriter) -> None:
        if not metrics["skipped"]:
            return
        streak, limit = int(metrics["nonfinite_streak"]), self.run_settings.train.max_consecutive_nonfinite
        writer.log(f"[train] step {step}: non-finite loss or gradient, update skipped "
                   f"({streak} in a row, {int(metrics['nonfinite_total'])} in total)")
        if streak >= limit:
            raise NonFiniteTrainingError(
                f"{streak} consecutive non-finite losses/gradients up to step {step} "
                f"(train.max_consecutive_nonfinite={limit}); the last good checkpoint is in {self.checkpoint_dir}. "
                f"Lower optim.peak_lr or check the data.")

    def _save(self, writer: MetricsWriter, force: bool = False) -> None:
        if force and self.saved_step == self.step:
            return
        if self.checkpointer.save(self.step, self.state, self.data, force=force):
            self.saved_step = self.step
            writer.sync()  # the metrics up to a checkpoint are stored when it is

    def _write_pending(self, pending: list, window_start: float, writer: MetricsWriter, rate) -> float:
        """Fetches the metrics of the `pending` (step, device metrics) and writes one row per step, with
        the window's average throughput; checks the non-finite limit. Returns the new window start."""
        if not pending:
            return window_start
        rows = jax.device_get([metrics for _, metrics in pending])
        now = time.perf_counter()
        tokens_per_s = sum(float(metrics["batch_tokens"]) for metrics in rows) / (now - window_start)
        for (step, _), metrics in zip(pending, rows):
            metrics.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * rate.flops_per_token / rate.peak)
            writer.write(step, metrics)
            self._check_nonfinite(step, metrics, writer)
        pending.clear()
        return now

    def _steps(self, step_fns: dict[int, Any], writer: MetricsWriter, stop: _StopSignals) -> None:
        """Trains until the last step or a stop signal: step, log, checkpoint, evaluate."""
        data, train = self.run_settings.data, self.run_settings.train
        total = train.steps
        rate = _Throughput(model_flops_per_token(self.program.model_cfg, data.seq_len,
                                                 stage=2 if self.program.objective == "stage2" else 1),
                           *peak_flops(dtype=self.program.model_cfg.execution.dtype))
        print(f"[train] {rate.flops_per_token / 1e6:.2f} MFLOP/token; peak {rate.peak / 1e12:.3f} TFLOP/s "
              f"({rate.peak_source})", flush=True)
        eval_every, log_every, checkpoint_every = train.eval_every, train.log_every, train.checkpoint_every
        pending, window_start = [], time.perf_counter()
        kill_after = int(os.environ.get(FAULT_KILL_ENV, "0"))
        while self.step < total and not stop.requested(self.step):
            multiple = data.batch_at(self.step) // data.batch_size
            batch = shd.global_batch(next_batch(self.data, multiple), self.mesh)
            self.profiler.before(self.step + 1)
            self.state, metrics = step_fns[multiple](self.state, batch)
            self.profiler.after(self.step + 1, metrics)
            for leaf in jax.tree.leaves(metrics):
                leaf.copy_to_host_async()
            self.step += 1
            pending.append((self.step, metrics))
            evaluate = bool(eval_every) and self.step % eval_every == 0 and self.step < total
            if self.step % log_every == 0 or self.step % checkpoint_every == 0 or evaluate or self.step == total:
                window_start = self._write_pending(pending, window_start, writer, rate)
            self._save(writer)
            if self.step == kill_after:
                _fault_kill(self.checkpointer)
            if evaluate:
                self._evaluate(writer)
                window_start = time.perf_counter()
        self._write_pending(pending, window_start, writer, rate)

    def run(self) -> TrainResult:
        run = self.run_settings
        _write_run_config(run, self.workdir)
        step_fns = self._compile()
        writer = MetricsWriter(self.workdir, total_steps=run.train.steps, log_every=run.train.log_every,
                               progress_bar=run.train.progress_bar, initial_step=self.step,
                               wandb_project=run.train.wandb_project, run_config=run.to_dict())
        try:
            with _StopSignals(run.train.stop_check_every) as stop:
                self._steps(step_fns, writer, stop)
                if stop.requested(self.step, force=True):
                    self._save(writer, force=True)
                    self.checkpointer.wait()
                    raise TrainingInterrupted(stop.signum, self.step, os.fspath(self.checkpoint_dir))
            self._save(writer, force=True)
            self._evaluate(writer)
            params_dir = None
            if run.train.export_params:
                params_dir = os.fspath(self.workdir / "params")
                save_params(params_dir, self.program.model_cfg, self.state.params)
            self.checkpointer.wait()
        finally:
            self.profiler.close()
            writer.close()
            self.checkpointer.close()
        return TrainResult(state=self.state, step=self.step, eval_metrics=self.eval_metrics,
                           checkpoint_dir=os.fspath(self.checkpoint_dir), params_dir=params_dir)


def train(config, workdir: paths.PathLike, explicit_model_fields: Collection[str] = ()) -> TrainResult:
    """Runs (or resumes) the training of `config` (a training ConfigDict, narrowed here once to
    RunSettings, or the RunSettings) in `workdir` (local or `gs://...`); `explicit_model_fields`: the
    config.model fields set on the command line (see `adopt_checkpoint_shape`)."""
    run = RunSettings.of(config)
    workdir = paths.as_path(workdir)
    paths.check_bucket(workdir)
    check_training(run)
    check_starting_point(run)
    check_fits(run)
    if run.init_from:
        run = adopt_checkpoint_shape(run, run.init_from, explicit_model_fields)
    cache_dir = compilation_cache_dir(run.train.compilation_cache_dir, workdir)
    with compilation_cache(cache_dir, run.train.compilation_cache_min_secs):
        if jax.process_index() != 0:
            return _Trainer(run, workdir).run()
        with WorkdirLock(workdir):
            return _Trainer(run, workdir).run()


def model_fields_summary(cfg: OuroConfig) -> str:
    return (f"d={cfg.hidden_size} N={cfg.num_hidden_layers} T={cfg.total_ut_steps} V={cfg.vocab_size} "
            f"dtype={cfg.execution.dtype}")


def report(result: TrainResult) -> str:
    """The closing lines: per-step accuracy and loss of each task, and where the checkpoints are."""
    lines = []
    for name, m in result.eval_metrics.items():
        if "perplexity" in m:
            lines.append(f"{name} held-out perplexity by recurrent step: " +
                         "  ".join(f"t={i + 1}: {p:.3f}" for i, p in enumerate(m["perplexity"])))
            continue
        lines.append(f"{name} held-out accuracy by recurrent step: " +
                     "  ".join(f"t={i + 1}: {a:.3f}" for i, a in enumerate(m["accuracy"])))
        lines.append(f"{name} held-out answer loss by recurrent step: " +
                     "  ".join(f"t={i + 1}: {c:.3f}" for i, c in enumerate(m["step_ce"])))
    lines.append(f"training checkpoints (resumable): {result.checkpoint_dir}")
    if result.params_dir:
        lines.append(f"params for inference: {result.params_dir}")
    return "\n".join(lines)
