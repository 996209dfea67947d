"""Per-step exact-match accuracy on the synthetic tasks (Mano, multi-hop QA), with the exit gates
at every answer token so the Q-exit sweep can pick each token's step without another pass; and the
accuracy of answers generated token by token (`decode_task`: KV-cache policies, early exit)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ouro_jax.data.pipeline import make_source
from ouro_jax.data.tasks import SyntheticTask
from ouro_jax.evaluation.forward import StepForward
from ouro_jax.evaluation.text import EvalInputError
from ouro_jax.inference import default_cache_length, generate


def make_eval_task(spec: str, vocab_size: int) -> SyntheticTask:
    """A task from a spec such as "mano:max_len=2,modulus=5" or "multihop_qa"; checked against the vocabulary."""
    name = spec.partition(":")[0]
    if name not in ("mano", "multihop_qa", "capo"):
        raise EvalInputError(f"unknown task {name!r}; expected 'mano', 'multihop_qa' or 'capo' (e.g. mano:max_len=10)")
    try:
        task = make_source(spec)
    except (TypeError, ValueError) as e:
        raise EvalInputError(f"task {spec!r}: {e}") from None
    if task.vocab_size > vocab_size:
        raise EvalInputError(f"task {spec!r} needs vocab_size {task.vocab_size} > the model's {vocab_size}")
    return task


@dataclasses.dataclass
class TaskScores:
    """predictions [T, n, A] (argmax at each answer token, teacher-forced) and gate logits {name: [T, n, A]}."""

    task: SyntheticTask
    prompts: np.ndarray
    step_ce: np.ndarray
    predictions: np.ndarray
    gate_logits: dict[str, np.ndarray]

    def accuracy(self, steps: np.ndarray) -> float:
        """Exact match when answer token j of example i is read at 0-based step steps[i, j]."""
        chosen = np.take_along_axis(self.predictions, steps[None], axis=0)[0]
        return self.task.evaluate(self.prompts, chosen)

    def step_accuracy(self) -> list[float]:
        return [self.task.evaluate(self.prompts, p) for p in self.predictions]

    def summary(self) -> dict[str, Any]:
        return {"examples": len(self.prompts), "step_accuracy": self.step_accuracy(),
                "step_ce": self.step_ce.mean(axis=(1, 2)).tolist()}


def score_task(forward: StepForward, params, task: SyntheticTask, *, num_examples: int, batch_size: int,
               progress: bool = True) -> TaskScores:
    """Teacher-forced predictions and gates at every answer token of `num_examples` held-out examples."""
    ev = task.eval_set(num_examples)
    n, prompt_len = ev.prompts.shape
    answer_len = ev.answers.shape[1]
    length = prompt_len + answer_len
    ids = np.concatenate([ev.prompts, ev.answers], axis=1).astype(np.int32)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    answer = slice(prompt_len - 1, prompt_len - 1 + answer_len)
    ce, preds, gates = [], [], {}
    for start in tqdm(range(0, n, batch_size), desc=task.name, disable=not progress):
        rows = slice(start, min(start + batch_size, n))
        count = rows.stop - rows.start
        batch = {"input_ids": _pad(ids[rows], batch_size), "targets": _pad(targets[rows], batch_size),
                 "segment_ids": _pad(np.ones((count, length), np.int32), batch_size),
                 "positions": _pad(np.broadcast_to(np.arange(length, dtype=np.int32), (count, length)), batch_size)}
        out = forward(params, batch)
        ce.append(out["step_ce"][:, :count, answer])
        preds.append(out["predictions"][:, :count, answer])
        for name, g in out["gate_logits"].items():
            gates.setdefault(name, []).append(g[:, :count, answer])
    return TaskScores(task, ev.prompts, np.concatenate(ce, 1), np.concatenate(preds, 1),
                      {k: np.concatenate(v, 1) for k, v in gates.items()})


def _pad(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Rows padded with zero rows to `batch_size` (one compiled shape for every batch)."""
    return np.pad(rows, [(0, batch_size - len(rows))] + [(0, 0)] * (rows.ndim - 1))


def decode_task(cfg, params, task: SyntheticTask, *, num_examples: int, batch_size: int, policy: str = "full",
                exit_threshold: float | None = None) -> dict[str, Any]:
    """Exact-match accuracy of answers generated token by token (greedy, `task.answer_len` new tokens) by the
    inference engine with KV-cache `policy` and Q-exit `exit_threshold` (early exit); also the accuracy at
    each answer position and the mean realized depth of the generated tokens."""
    ev = task.eval_set(num_examples)
    width = ev.prompts.shape[1]
    cache_length = default_cache_length(width, task.answer_len)  # one compiled program for every batch
    tokens, depths = [], []
    for start in range(0, len(ev), batch_size):
        out = generate(cfg, params, ev.prompts[start:start + batch_size], max_new_tokens=task.answer_len,
                       policy=policy, exit_threshold=exit_threshold, cache_length=cache_length)
        tokens.append(out.tokens)
        depths.append(out.depths)
    tokens, depths = np.concatenate(tokens), np.concatenate(depths)
    want = np.stack([task.solve(p) for p in ev.prompts])
    return {"policy": policy, "exit_threshold": exit_threshold, "examples": len(ev),
            "accuracy": task.evaluate(ev.prompts, tokens), "token_accuracy": (tokens == want).mean(axis=0).tolist(),
            "mean_depth": float(depths.mean())}
