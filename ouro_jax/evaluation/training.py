"""Evaluations the training loop runs every `train.eval_every` steps on the train program's `evaluate`.

- `TaskEvaluation`: per-step loss and exact-match accuracy of a synthetic task's held-out examples.
- `TextEvaluation`: per-step cross-entropy and perplexity of held-out text (`data.eval_sources`).
`make_evaluations(data, vocab_size, sources, mesh)` builds both kinds from the run's data settings.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from ouro_jax import sharding as shd
from ouro_jax.data.tasks import SyntheticTask
from ouro_jax.evaluation.text import text_batches, text_source


def _sharded_batch_size(batch_size: int, mesh) -> int:
    """`batch_size` rounded up to a multiple of the batch shards and the process count."""
    shards = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    return -(-batch_size // shards) * shards


def _run(program, params, batches: list[dict[str, np.ndarray]], mesh) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """(step CE sum [T], scored tokens, per-batch predictions [T, B, S]) over `batches` (global rows)."""
    ce_sum, tokens, predictions = 0.0, 0.0, []
    pi, pc = jax.process_index(), jax.process_count()
    for rows in batches:
        local = {k: v[pi * len(v) // pc:(pi + 1) * len(v) // pc] for k, v in rows.items()}
        out = jax.device_get(program.evaluate(params, shd.global_batch(local, mesh)))
        ce_sum, tokens = ce_sum + out["step_ce_sum"], tokens + out["tokens"]
        predictions.append(out["predictions"])
    return ce_sum, tokens, predictions


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
        self.batch_size = _sharded_batch_size(batch_size, mesh)
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

    def __call__(self, program, params) -> dict[str, np.ndarray]:
        batches = [{k: v[s:s + self.batch_size] for k, v in self.batch.items()}
                   for s in range(0, len(self.batch["input_ids"]), self.batch_size)]
        ce_sum, tokens, predictions = _run(program, params, batches, self.mesh)
        predictions = np.concatenate(predictions, axis=1)[:, :self.n, self.answer_slice]
        accuracy = [self.task.evaluate(self.prompts, step_pred) for step_pred in predictions]
        return {"step_ce": ce_sum / max(tokens, 1.0), "accuracy": np.asarray(accuracy)}


class TextEvaluation:
    """Per-step cross-entropy and perplexity of held-out text (the first `max_tokens` scored tokens of
    `path`, a prepared shard directory or a .jsonl / .txt file), fixed once at construction."""

    def __init__(self, path: str, vocab_size: int, seq_len: int, batch_size: int, mesh, *, max_tokens: int,
                 tokenizer: str | None = None):
        self.mesh = mesh
        source = text_source(path, vocab_size, tokenizer=tokenizer)
        self.batches = list(text_batches(source, seq_len=seq_len, batch_size=_sharded_batch_size(batch_size, mesh),
                                         max_tokens=max_tokens))

    def __call__(self, program, params) -> dict[str, np.ndarray]:
        ce_sum, tokens, _ = _run(program, params, self.batches, self.mesh)
        step_ce = np.asarray(ce_sum / max(tokens, 1.0))
        return {"step_ce": step_ce, "perplexity": np.exp(step_ce)}


def make_evaluations(data, vocab_size: int, sources: list[Any], mesh) -> dict[str, Any]:
    """Task evaluations of the training sources and text evaluations of `data.eval_paths` (`data`: the
    run's DataSettings, ouro_jax.train.settings)."""
    evals: dict[str, Any] = {}
    for src in sources:
        if isinstance(src, SyntheticTask) and data.eval_examples > 0:
            evals[src.name] = TaskEvaluation(src, data.eval_examples, data.seq_len, data.eval_batch_size, mesh)
    for path in data.eval_paths:
        name = "text:" + os.path.basename(os.path.normpath(path))
        evals[name] = TextEvaluation(path, vocab_size, data.seq_len, data.eval_batch_size, mesh,
                                     max_tokens=data.eval_tokens, tokenizer=data.eval_tokenizer or None)
    return evals
