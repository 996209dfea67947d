"""The library entry point: evaluate a checkpoint on text and/or a synthetic task, with the Q-exit sweep.

    result = evaluate_model("runs/demo/params", task="mano:max_len=2,modulus=5", output_dir="eval_out")

writes `results.json` and one `sweep_<name>.png` per evaluated input into output_dir (when given; the
plots need matplotlib, the `eval` extra: without it results.json says so and the numbers are all there).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from ouro_jax import validate
from ouro_jax.config import ARCHITECTURE_FIELDS, Execution, OuroConfig
from ouro_jax.errors import one_line
from ouro_jax.evaluation.forward import StepForward
from ouro_jax.evaluation.plot import PLOTS_NEED_EXTRA, plot_sweep, plotting_available
from ouro_jax.evaluation.sweep import DEFAULT_THRESHOLDS, ce_quality, check_thresholds, sweep
from ouro_jax.evaluation.tasks import make_eval_task, score_task
from ouro_jax.evaluation.text import EvalInputError, score_text, text_source
from ouro_jax.model_source import ModelSource, resolve_model
from ouro_jax.params_io import load_model
from ouro_jax.paths import as_path, check_bucket, write_atomic


def load_checkpoint(spec: str, *, dtype: str | None = None) -> tuple[ModelSource, OuroConfig, Any]:
    """(source, config, params) of any model spec (`ouro_jax.model_source`); `dtype` sets the compute dtype.
    A model that does not load raises EvalInputError."""
    source = resolve_model(spec)  # CheckpointError: one line naming what `spec` is not
    try:
        execution = None if dtype is None else Execution(dtype=validate.compute_dtype(dtype, "--dtype"))
        cfg, params = load_model(source, execution=execution)
    except (OSError, ValueError, KeyError) as e:
        raise EvalInputError(f"{spec}: cannot load the model ({one_line(e)})") from None
    return source, cfg, params


def _check_sizes(cfg: OuroConfig, seq_len: int, batch_size: int, num_steps: int | None) -> None:
    """Text rows the model's positions cover (seq_len 0: no text), and a batch whose per-step logits fit."""
    if seq_len:
        validate.positions("seq_len", seq_len, cfg.max_position_embeddings)
    validate.positive("batch_size", batch_size)
    depth = num_steps or cfg.total_ut_steps  # one float32 [B, S, V] logits block and hidden state per step, at least
    validate.fits_memory(f"evaluating batch {batch_size} x {seq_len}",
                         4 * batch_size * seq_len * (cfg.vocab_size + cfg.hidden_size) * depth)


def evaluate_model(model: str, *, text: Sequence[str] = (), task: str | None = None, gate_from: str | None = None,
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS, num_steps: int | None = None, seq_len: int = 512,
                   batch_size: int = 8, max_tokens: int | None = 65536, num_examples: int = 512,
                   tokenizer: str | None = None, text_field: str = "text", dtype: str | None = None,
                   output_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Per-step CE / perplexity on each text input, per-step accuracy on `task`, and the quality-vs-compute
    sweep of each (static exit at every step, Q-exit with the model's gate and with `gate_from`'s gate)."""
    thresholds = check_thresholds(thresholds)
    if not text and task is None:
        raise EvalInputError("nothing to evaluate: give text inputs and/or a task")
    if num_steps is not None:
        validate.num_steps(num_steps)
    if max_tokens is not None:
        validate.positive("max_tokens", max_tokens)
    if output_dir is not None:
        check_bucket(output_dir)
    source, cfg, params = load_checkpoint(model, dtype=dtype)
    _check_sizes(cfg, seq_len if text else 0, batch_size, num_steps)
    gates = {}
    if gate_from is not None:
        _, gate_cfg, gate_params = load_checkpoint(gate_from)
        differ = [f"{k} {getattr(gate_cfg, k)} (model: {getattr(cfg, k)})" for k in ARCHITECTURE_FIELDS
                  if getattr(gate_cfg, k) != getattr(cfg, k)]
        if differ:
            raise EvalInputError(f"{gate_from}: not a gate trained on this model ({', '.join(differ)})")
        gates["trained"] = gate_params["exit_gate"]
    sources = [(p, text_source(p, cfg.vocab_size, tokenizer=tokenizer, model_dir=source.tokenizer_dir,
                               text_field=text_field)) for p in text]
    eval_task = make_eval_task(task, cfg.vocab_size) if task is not None else None

    result: dict[str, Any] = {"model": model, "gate_from": gate_from, "num_layers": cfg.num_hidden_layers,
                              "num_steps": num_steps or cfg.total_ut_steps, "thresholds": thresholds,
                              "text": {}, "task": None}
    plots = {}
    if sources:
        forward = StepForward(cfg, gates=gates, num_steps=num_steps)
        for name, source in sources:
            scores = score_text(forward, params, source, seq_len=seq_len, batch_size=batch_size,
                                max_tokens=max_tokens, progress=progress)
            entry = {**scores.summary(), "sweep": sweep(scores.gate_logits, ce_quality(scores.step_ce), metric="ce",
                                                        num_layers=cfg.num_hidden_layers, thresholds=thresholds)}
            result["text"][name] = entry
            plots[f"text_{_slug(name)}"] = (entry["sweep"], f"{os.path.basename(os.path.normpath(name))}: CE vs depth")
    if eval_task is not None:
        forward = StepForward(cfg, gates=gates, predictions=True, num_steps=num_steps)
        scores = score_task(forward, params, eval_task, num_examples=num_examples, batch_size=batch_size,
                            progress=progress)
        result["task"] = {"spec": task, **scores.summary(),
                          "sweep": sweep(scores.gate_logits, scores.accuracy, metric="accuracy",
                                         num_layers=cfg.num_hidden_layers, thresholds=thresholds)}
        plots[f"task_{eval_task.name}"] = (result["task"]["sweep"], f"{task}: accuracy vs depth")
    if output_dir is not None:
        write_outputs(as_path(output_dir), result, plots)
    return result


def write_outputs(output, result: dict[str, Any], plots: dict[str, tuple[dict, str]]) -> None:
    """results.json first (the numbers never wait on plotting), then one PNG per entry of `plots` when
    matplotlib is installed (the `eval` extra); results.json then names the PNGs, or why there are none."""
    output.mkdir(parents=True, exist_ok=True)
    result["plots"] = {}
    write_atomic(output / "results.json", json.dumps(result, indent=2))
    if not plots:
        return
    if not plotting_available():
        result["plots_skipped"] = PLOTS_NEED_EXTRA
        write_atomic(output / "results.json", json.dumps(result, indent=2))
        return
    for stem, (curves, title) in plots.items():
        png = output / f"sweep_{stem}.png"
        plot_sweep(curves, png, title=title)
        result["plots"][stem] = os.fspath(png)
    write_atomic(output / "results.json", json.dumps(result, indent=2))


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(name))) or "text"
