"""Evaluation of looped models: per-step quality, quality vs compute, task accuracy, lm-eval adapter.

    evaluate_model(model, text=[...], task="mano:...", gate_from=..., output_dir=...)   # the CLI's core
    StepForward(cfg, gates=...)(params, batch)     # every step's CE, gate logits (and predictions) in one pass
    score_text(...) / score_task(...)              # per-token scores; sweep(...) / plot_sweep(...)
    decode_task(cfg, params, task, policy=...)    # accuracy of greedy generated answers (KV-cache policies)
    TaskEvaluation, TextEvaluation, make_evaluations   # what the training loop evaluates
The lm-eval-harness backend `ouro_jax` lives in `ouro_jax.evaluation.lm_eval_adapter` (needs the `eval` extra).
"""

from ouro_jax.evaluation.forward import MODEL_GATE, StepForward
from ouro_jax.evaluation.plot import plot_sweep
from ouro_jax.evaluation.runner import evaluate_model, load_checkpoint
from ouro_jax.evaluation.sweep import DEFAULT_THRESHOLDS, ce_quality, sweep
from ouro_jax.evaluation.tasks import TaskScores, decode_task, make_eval_task, score_task
from ouro_jax.evaluation.text import HELD_OUT_TEXT, EvalInputError, TokenScores, score_text, text_batches, text_source
from ouro_jax.evaluation.training import TaskEvaluation, TextEvaluation, make_evaluations
from ouro_jax.model_source import resolve_model

__all__ = [
    "DEFAULT_THRESHOLDS", "EvalInputError", "HELD_OUT_TEXT", "MODEL_GATE", "StepForward", "TaskEvaluation",
    "TaskScores",
    "TextEvaluation", "TokenScores", "ce_quality", "decode_task", "evaluate_model", "load_checkpoint", "make_eval_task",
    "make_evaluations", "plot_sweep", "resolve_model", "score_task", "score_text", "sweep", "text_batches",
    "text_source",
]
