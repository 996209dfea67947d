"""Synthetic reasoning tasks of the paper (SPEC 7) as pipeline sources with exact-match evaluators.

Every task shares the token ids 0 = pad, 1 = `<bos>`, 2 = `<ans>`; an example is
`prompt = <bos> ... <ans>` followed by the answer tokens, and only answer tokens carry loss.
A task is deterministic given its `seed` (the problem instance and the held-out set) and the
pipeline seed (the order and sampling of training examples).

    task = make_task("mano", max_len=10)              # or Mano(max_len=10), MultiHopQA(hops=3)
    batches = make_batch_iterator(task, seq_len=64, batch_size=32)   # ouro_jax.data.pipeline
    ev = task.eval_set(512)                           # held-out prompts [n, P], answers [n, A]
    accuracy = task.evaluate(ev.prompts, predicted)   # recomputes every answer from the prompt
"""

from __future__ import annotations

import abc
import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

PAD, BOS, ANS = 0, 1, 2
NUM_SHARED_TOKENS = 3


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Held-out examples: prompts end with `<ans>`; a model must produce `answers` next."""

    prompts: np.ndarray  # int32 [n, P]
    answers: np.ndarray  # int32 [n, A]

    def __len__(self) -> int:
        return len(self.prompts)


def example_rng(*key: Any) -> random.Random:
    """A random stream fixed by `key` (str seeding hashes with SHA-512: stable across Python versions)."""
    return random.Random("/".join(map(str, key)))


class SyntheticTask(abc.ABC):
    """A task as a pipeline source: `documents(seed)` yields `{"input_ids", "target_weight"}`."""

    name: str
    vocab_size: int
    max_example_len: int  # tokens in the longest training example
    answer_len: int
    keep_whole = True  # packing must never split an example across rows
    num_train_examples: int | None  # None: an endless stream of fresh examples

    @property
    def is_finite(self) -> bool:
        return self.num_train_examples is not None

    @abc.abstractmethod
    def train_example(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt int32 [P], answer int32 [A]) number `index` of the training stream `seed`."""

    @abc.abstractmethod
    def eval_set(self, n: int) -> EvalSet:
        """`n` held-out evaluation examples (fixed by the task seed)."""

    @abc.abstractmethod
    def solve(self, prompt: np.ndarray) -> np.ndarray:
        """The answer tokens of `prompt`, recomputed from the prompt alone (the evaluator)."""

    @abc.abstractmethod
    def token_name(self, token: int) -> str:
        """Human-readable name of one token id."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return " ".join(self.token_name(int(t)) for t in tokens)

    def document(self, seed: int, index: int) -> dict[str, np.ndarray]:
        prompt, answer = self.train_example(seed, index)
        ids = np.concatenate([prompt, answer]).astype(np.int32)
        weight = np.zeros(len(ids), np.int32)
        weight[len(prompt):] = 1
        return {"input_ids": ids, "target_weight": weight}

    def documents(self, seed: int):
        """grain MapDataset of training documents; index-addressed, so shardable and resumable."""
        import grain

        n = self.num_train_examples if self.is_finite else 2**62
        return grain.MapDataset.range(n).map(_TaskDocument(self, seed))

    def evaluate(self, prompts: np.ndarray | Sequence[np.ndarray], predicted: np.ndarray) -> float:
        """Exact-match accuracy of `predicted` int [n, A] (or [n]) against answers recomputed by `solve`."""
        predicted = np.asarray(predicted)
        if predicted.ndim == 1:
            predicted = predicted[:, None]
        if len(prompts) != len(predicted) or predicted.ndim != 2 or predicted.shape[1] != self.answer_len:
            raise ValueError(f"expected predictions [{len(prompts)}, {self.answer_len}] for {len(prompts)} prompts, "
                             f"got {predicted.shape}")
        if not len(prompts):
            raise ValueError("evaluate needs at least one prompt")
        correct = [np.array_equal(self.solve(np.asarray(p)), a) for p, a in zip(prompts, predicted)]
        return float(np.mean(correct))


@dataclasses.dataclass(frozen=True)
class _TaskDocument:
    """Picklable index -> document map (grain workers receive it by pickling)."""

    task: SyntheticTask
    seed: int

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return self.task.document(self.seed, int(index))
