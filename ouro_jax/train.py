"""Training loop and CLI: `python -m ouro_jax.train --config configs/<name>.py --workdir DIR [--config.k=v]`.

WORKDIR gets `checkpoints/` (orbax: train state + data iterator, async, newest K kept),
`metrics.jsonl` and `tb/` (every step), and `params/` (a params-only export for inference) at the
end. Re-running the same command resumes from the newest restorable checkpoint and continues
bit-for-bit. SIGTERM / SIGINT save a checkpoint and exit (status 128 + signal). Non-finite losses
or gradients skip the update; `train.max_consecutive_nonfinite` in a row stop the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from ouro_jax import sharding as shd
from ouro_jax.checkpoint import TrainCheckpointer, load_model, load_model_config, save_params
from ouro_jax.config import EXECUTION_FIELDS, OuroConfig
from ouro_jax.data import make_batch_iterator, make_source
from ouro_jax.data.tasks import SyntheticTask
from ouro_jax.metrics import MetricsWriter, model_flops_per_token, peak_flops
from ouro_jax.trainer import TrainProgram, TrainState, as_model_batch, build_train_program, place_params

NUMERIC_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "scan_steps", *EXECUTION_FIELDS)


class NonFiniteTrainingError(RuntimeError):
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

def _source_specs(data_cfg) -> list[str]:
    specs = [s.strip() for s in str(data_cfg.sources).split(";") if s.strip()]
    if not specs:
        raise ValueError("config.data.sources is empty; give e.g. 'mano:max_len=10' or a prepared directory")
    return specs


def make_sources(config, model_cfg: OuroConfig) -> list[Any]:
    """The data sources of `config.data.sources` (';'-separated specs), checked against the vocabulary."""
    specs = _source_specs(config.data)
    sources = [make_source(spec) for spec in specs]
    for spec, src in zip(specs, sources):
        if src.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"data source {spec!r} has vocab_size {src.vocab_size} > model.vocab_size "
                             f"{model_cfg.vocab_size}")
    return sources


def make_train_iterator(config, sources: list[Any]):
    """This process's grain iterator of training batches (global batch / process count rows)."""
    count = jax.process_count()
    if config.data.batch_size % count:
        raise ValueError(f"data.batch_size ({config.data.batch_size}) must be divisible by the {count} processes")
    weights = [float(w) for w in str(config.data.weights).split(",") if w.strip()] or None
    return make_batch_iterator(sources, seq_len=int(config.data.seq_len), batch_size=config.data.batch_size // count,
                               weights=weights, seed=int(config.data.seed), num_workers=int(config.data.num_workers))


class TaskEvaluation:
    """Per-step loss and exact-match accuracy of a task's held-out examples (teacher-forced argmax
    of every answer token, which equals greedy decoding's exact match)."""

    def __init__(self, task: SyntheticTask, num_examples: int, seq_len: int, batch_size: int, mesh):
        ev = task.eval_set(num_examples)
        self.task, self.prompts, self.mesh = task, ev.prompts, mesh
        n, prompt_len = ev.prompts.shape
        answer_len = ev.answers.shape[1]
        if prompt_len + answer_len > seq_len:
            raise ValueError(f"{task!r} eval examples need {prompt_len + answer_len} tokens > data.seq_len {seq_len}")
        shards = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
        self.batch_size = -(-batch_size // shards) * shards
        rows = -(-n // self.batch_size) * self.batch_size
        ids = np.zeros((rows, seq_len), np.int32)
        ids[:n, :prompt_len + answer_len] = np.concatenate([ev.prompts, ev.answers], axis=1)
        targets = np.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        mask = np.zeros(ids.shape, np.float32)
        mask[:n, prompt_len - 1:prompt_len - 1 + answer_len] = 1.0
        segments = np.zeros_like(ids)
        segments[:n, :prompt_len + answer_len] = 1
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape)
        self.batch = dict(input_ids=ids, targets=targets, segment_ids=segments, positions=positions, loss_mask=mask)
        self.answer_slice = slice(prompt_len - 1, prompt_len - 1 + answer_len)
        self.n = n

    def __call__(self, program: TrainProgram, params) -> dict[str, np.ndarray]:
        ce_sum, tokens, predictions = 0.0, 0.0, []
        pi, pc = jax.process_index(), jax.process_count()
        for start in range(0, len(self.batch["input_ids"]), self.batch_size):
            rows = {k: v[start:start + self.batch_size] for k, v in self.batch.items()}
            local = {k: v[pi * len(v) // pc:(pi + 1) * len(v) // pc] for k, v in rows.items()}
            out = jax.device_get(program.evaluate(params, shd.global_batch(local, self.mesh)))
            ce_sum, tokens = ce_sum + out["step_ce_sum"], tokens + out["tokens"]
            predictions.append(out["predictions"])
        predictions = np.concatenate(predictions, axis=1)[:, :self.n, self.answer_slice]
        accuracy = [self.task.evaluate(self.prompts, step_pred) for step_pred in predictions]
        return {"step_ce": ce_sum / max(tokens, 1.0), "accuracy": np.asarray(accuracy)}


def make_evaluations(config, sources: list[Any], mesh) -> dict[str, TaskEvaluation]:
    evals = {}
    for src in sources:
        if isinstance(src, SyntheticTask) and config.data.eval_examples > 0:
            evals[src.name] = TaskEvaluation(src, int(config.data.eval_examples), int(config.data.seq_len),
                                             int(config.data.eval_batch_size), mesh)
    return evals


# ---- model initialization ---------------------------------------------------------------------

def adopt_checkpoint_shape(config, path: str) -> None:
    """Sets every model field but the numerics (dtype, param_dtype, remat, scan switches) from the
    checkpoint at `path`: the checkpoint defines the model it holds."""
    stored = dataclasses.asdict(load_model_config(path))
    changed = {k: (config.model[k], v) for k, v in stored.items() if k not in NUMERIC_FIELDS and config.model[k] != v}
    if changed:
        print(f"[init] model fields taken from {path}: " +
              ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), flush=True)
    with config.unlocked():
        for k, (_, v) in changed.items():
            config.model[k] = v


# ---- the loop ---------------------------------------------------------------------------------

class _StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (a second SIGINT aborts)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def requested(self) -> bool:
        """Whether any process got a stop signal (all processes agree, so they save the same step)."""
        if jax.process_count() == 1:
            return self.signum is not None
        from jax.experimental import multihost_utils

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


def train(config, workdir: str) -> TrainResult:
    """Runs (or resumes) the training of `config` in `workdir`."""
    workdir = os.path.abspath(workdir)
    if config.init_from:
        adopt_checkpoint_shape(config, config.init_from)
    mesh = shd.make_mesh(dict(config.mesh))
    program = build_train_program(config, mesh, dict(config.train.compiler_options) or None)
    model_cfg, total_steps = program.model_cfg, int(config.train.steps)
    sources = make_sources(config, model_cfg)
    data = make_train_iterator(config, sources)
    evaluations = make_evaluations(config, sources, mesh)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpointer = TrainCheckpointer(checkpoint_dir, save_every=int(config.train.checkpoint_every),
                                     keep=int(config.train.keep_checkpoints) or None,
                                     async_save=bool(config.train.async_checkpointing))
    restored = checkpointer.restore_latest(program.abstract_state, data)
    saved_step = None
    if restored is not None:
        step, state = restored
        saved_step = step
        print(f"[train] resumed from step {step} ({checkpoint_dir})", flush=True)
    elif config.init_from:
        _, params = load_model(config.init_from, param_dtype=model_cfg.param_dtype)
        step, state = 0, place_params(program, params)
        print(f"[train] initialized from {config.init_from}", flush=True)
    else:
        step, state = 0, program.init(jax.random.key(int(config.seed)))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    start = time.perf_counter()
    step_fn = program.step.lower(program.abstract_state, program.abstract_batch).compile()
    print(f"[train] stage {program.stage}, model {model_fields_summary(model_cfg)}, mesh {dict(mesh.shape)}, "
          f"compiled in {time.perf_counter() - start:.1f}s", flush=True)
    tokens_per_step = int(config.data.batch_size) * int(config.data.seq_len)
    flops_per_token = model_flops_per_token(model_cfg, int(config.data.seq_len), stage=program.stage)
    peak, peak_source = peak_flops(dtype=model_cfg.dtype)
    print(f"[train] {flops_per_token / 1e6:.2f} MFLOP/token; peak {peak / 1e12:.3f} TFLOP/s ({peak_source})", flush=True)
    writer = MetricsWriter(workdir, total_steps=total_steps, log_every=int(config.train.log_every),
                           progress_bar=bool(config.train.progress_bar), initial_step=step)
    eval_every = int(config.train.eval_every)
    eval_metrics: dict[str, Any] = {}

    def run_evaluations(at_step: int) -> None:
        for name, evaluation in evaluations.items():
            eval_metrics[name] = evaluation(program, state.params)
            writer.write(at_step, eval_metrics[name], kind=f"eval/{name}")

    try:
        with _StopSignals() as stop:
            last = time.perf_counter()
            while step < total_steps and not stop.requested():
                batch = shd.global_batch(as_model_batch(next(data)), mesh)
                state, metrics = step_fn(state, batch)
                metrics = jax.device_get(metrics)
                step += 1
                now = time.perf_counter()
                tokens_per_s = tokens_per_step / (now - last)
                last = now
                metrics.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops_per_token / peak)
                writer.write(step, metrics)
                if metrics["skipped"]:
                    writer.log(f"[train] step {step}: non-finite loss or gradient, update skipped "
                               f"({int(metrics['nonfinite_streak'])} in a row, {int(metrics['nonfinite_total'])} in total)")
                    if metrics["nonfinite_streak"] >= int(config.train.max_consecutive_nonfinite):
                        raise NonFiniteTrainingError(
                            f"{int(metrics['nonfinite_streak'])} consecutive non-finite losses/gradients up to step "
                            f"{step} (train.max_consecutive_nonfinite={config.train.max_consecutive_nonfinite}); "
                            f"the last good checkpoint is in {checkpoint_dir}. Lower optim.peak_lr or check the data.")
                if checkpointer.save(step, state, data):
                    saved_step = step
                if eval_every and step % eval_every == 0 and step < total_steps:
                    run_evaluations(step)
                    last = time.perf_counter()
            if stop.signum is not None:
                if saved_step != step:
                    checkpointer.save(step, state, data, force=True)
                checkpointer.wait()
                raise TrainingInterrupted(stop.signum, step, checkpoint_dir)
        if saved_step != step:
            checkpointer.save(step, state, data, force=True)
        run_evaluations(step)
        params_dir = None
        if config.train.export_params:
            params_dir = os.path.join(workdir, "params")
            save_params(params_dir, model_cfg, state.params)
        checkpointer.wait()
    finally:
        writer.close()
        checkpointer.close()
    return TrainResult(state=state, step=step, eval_metrics=eval_metrics, checkpoint_dir=checkpoint_dir,
                       params_dir=params_dir)


def model_fields_summary(cfg: OuroConfig) -> str:
    return (f"d={cfg.hidden_size} N={cfg.num_hidden_layers} T={cfg.total_ut_steps} V={cfg.vocab_size} "
            f"dtype={cfg.dtype}")


def report(result: TrainResult) -> str:
    """The closing lines: per-step accuracy and loss of each task, and where the checkpoints are."""
    lines = []
    for name, m in result.eval_metrics.items():
        lines.append(f"{name} held-out accuracy by recurrent step: " +
                     "  ".join(f"t={i + 1}: {a:.3f}" for i, a in enumerate(m["accuracy"])))
        lines.append(f"{name} held-out answer loss by recurrent step: " +
                     "  ".join(f"t={i + 1}: {c:.3f}" for i, c in enumerate(m["step_ce"])))
    lines.append(f"training checkpoints (resumable): {result.checkpoint_dir}")
    if result.params_dir:
        lines.append(f"params for inference: {result.params_dir}")
    return "\n".join(lines)


def main(argv) -> None:
    from absl import flags

    from absl import logging

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config.distributed:
        jax.distributed.initialize()
    try:
        result = train(config, workdir)
    except TrainingInterrupted as e:
        print(f"[train] {e}", flush=True)
        sys.exit(128 + e.signum)
    print(report(result), flush=True)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error (e.g. an unknown --config.key) instead of a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- config_flags raises AttributeError/KeyError/TypeError/ValueError
        message = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
            message = message[1:-1]
        print(f"ouro_jax.train: bad command line ({type(e).__name__}): {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config file (configs/<name>.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the exported params")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
