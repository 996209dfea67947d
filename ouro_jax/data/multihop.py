"""k-hop QA over a random layered entity graph (SPEC 7: 5 layers x 100 entities, 20 relations, k = 3).

Every entity of layer i < last has, for each relation r, one random target entity in layer i + 1.
"Who is the r3 of the r2 of the r1 of X?" is `<bos> r3 r2 r1 X <ans> Y` (read as written: the
outermost relation first), with X in one of the first `start_layers` layers (default: every layer
with `hops` layers below it) and Y, the answer, exactly `hops` layers below X. An atomic fact is the
1-hop case `<bos> r X <ans> Y`.

Training documents: every atomic fact of the graph plus the training k-hop questions, given as a
count (`num_train_questions`, default 20000) or as a fraction of all k-hop questions (`train_fraction`).
Held-out split: with `num_heldout`, exactly that many questions (a seeded permutation puts them first,
the training questions follow); otherwise each question is held out with probability `test_fraction`
(a keyed hash fixed by `seed`). Training questions never come from the held-out split and evaluation
questions (`eval_set`) always do, so evaluation measures composition of stored facts, not memorized
questions. The paper's setup (SPEC 7): `start_layers=1, num_heldout=3000`: 100 x 20^3 = 8 x 10^5
3-hop questions, 3000 of them held out, a fraction of the rest trained on.

Token ids: 0 pad, 1 <bos>, 2 <ans>, 3..3+R-1 relations, then entities layer by layer;
vocab_size = 3 + R + num_layers * entities_per_layer (523 by default).
"""

from __future__ import annotations

import numpy as np

from ouro_jax.data.tasks import ANS, BOS, NUM_SHARED_TOKENS, EvalSet, SyntheticTask


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix: a keyed hash of question ids for the held-out split."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MultiHopQA(SyntheticTask):
    name = "multihop_qa"
    answer_len = 1

    def __init__(self, hops: int = 3, num_layers: int = 5, entities_per_layer: int = 100,
                 num_relations: int = 20, num_train_questions: int | None = None, test_fraction: float = 0.1,
                 seed: int = 0, start_layers: int | None = None, num_heldout: int | None = None,
                 train_fraction: float | None = None):
        if not 2 <= hops < num_layers:  # 1-hop questions are the atomic facts, which are all trained on
            raise ValueError(f"hops must be in [2, num_layers - 1] = [2, {num_layers - 1}], got {hops}")
        if entities_per_layer < 1 or num_relations < 1:
            raise ValueError("entities_per_layer and num_relations must be >= 1")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.hops, self.num_layers, self.seed = hops, num_layers, seed
        self.entities_per_layer, self.num_relations = entities_per_layer, num_relations
        self.test_fraction, self.num_heldout = test_fraction, num_heldout
        self.start_layers = num_layers - hops if start_layers is None else start_layers
        if not 1 <= self.start_layers <= num_layers - hops:
            raise ValueError(f"start_layers must be in [1, num_layers - hops] = [1, {num_layers - hops}], "
                             f"got {start_layers}")
        self.entity_base = NUM_SHARED_TOKENS + num_relations
        self.vocab_size = self.entity_base + num_layers * entities_per_layer
        self.max_example_len = hops + 4
        e, r = entities_per_layer, num_relations
        rng = np.random.default_rng([seed, 0])
        # edges[x, r]: the r-target (global entity id) of every entity x outside the last layer.
        layer_of_source = np.arange(e * (num_layers - 1)) // e
        self.edges = (rng.integers(0, e, size=(e * (num_layers - 1), r)) + (layer_of_source[:, None] + 1) * e)
        self.num_facts = self.edges.size
        self.num_starts = e * self.start_layers
        self.num_questions = self.num_starts * r**hops
        num_train = self._train_count(num_train_questions, train_fraction)
        if num_heldout is None:
            max_train = int(self.num_questions * (1 - test_fraction) * 0.5)
            if not 0 <= num_train <= max_train:
                raise ValueError(f"num_train_questions must be in [0, {max_train}] (half the non-held-out "
                                 f"{hops}-hop questions), got {num_train}")
            self.train_questions = self._sample_questions(num_train, heldout=False, stream=1)
        else:
            self.train_questions = self._exact_split(num_heldout, num_train)
        self.num_train_examples = self.num_facts + num_train

    def _train_count(self, num_train_questions: int | None, train_fraction: float | None) -> int:
        if train_fraction is None:
            return 20000 if num_train_questions is None else num_train_questions
        if num_train_questions is not None:
            raise ValueError("give num_train_questions or train_fraction, not both")
        if not 0.0 <= train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
        return round(train_fraction * self.num_questions)

    def _exact_split(self, num_heldout: int, num_train: int) -> np.ndarray:
        """Held-out ids: the first `num_heldout` of a seeded permutation; returns the training ids, which follow."""
        if not 0 < num_heldout < self.num_questions:
            raise ValueError(f"num_heldout must be in [1, {self.num_questions - 1}], got {num_heldout}")
        if not 0 <= num_train <= self.num_questions - num_heldout:
            raise ValueError(f"num_train_questions must be in [0, {self.num_questions - num_heldout}] (the "
                             f"questions not held out), got {num_train}")
        order = np.random.default_rng([self.seed, 3]).permutation(self.num_questions)
        self.heldout_questions = order[:num_heldout]
        self._heldout_mask = np.zeros(self.num_questions, bool)
        self._heldout_mask[self.heldout_questions] = True
        return order[num_heldout:num_heldout + num_train]

    def __repr__(self) -> str:
        return (f"MultiHopQA(hops={self.hops}, num_layers={self.num_layers}, entities_per_layer="
                f"{self.entities_per_layer}, num_relations={self.num_relations}, num_train_questions="
                f"{len(self.train_questions)}, test_fraction={self.test_fraction}, seed={self.seed}, "
                f"start_layers={self.start_layers}, num_heldout={self.num_heldout})")

    def is_heldout(self, question_ids: np.ndarray) -> np.ndarray:
        """bool per k-hop question id (start * R^k + relations in base R): in the held-out split?"""
        if self.num_heldout is not None:
            return self._heldout_mask[np.asarray(question_ids, np.int64)]
        key = np.uint64((self.seed * 0x632BE59BD9B4E019 + 1) % 2**64)
        u = _splitmix64(np.asarray(question_ids, np.uint64) ^ key) >> np.uint64(11)
        return u.astype(np.float64) / 2.0**53 < self.test_fraction

    def _sample_questions(self, n: int, heldout: bool, stream: int) -> np.ndarray:
        """`n` distinct question ids of one split, in a fixed random order."""
        rng = np.random.default_rng([self.seed, stream])
        chosen = np.zeros(0, np.int64)
        while len(chosen) < n:
            cand = rng.integers(0, self.num_questions, size=2 * (n - len(chosen)) + 64)
            cand = cand[self.is_heldout(cand) == heldout]
            merged = np.concatenate([chosen, cand])
            _, first = np.unique(merged, return_index=True)
            chosen = merged[np.sort(first)]
        return chosen[:n]

    def _question(self, qid: int) -> tuple[int, list[int]]:
        """(start entity, [r1..rk] in hop order) of question id `qid`."""
        start, rest = divmod(int(qid), self.num_relations**self.hops)
        rels = []
        for _ in range(self.hops):
            rest, r = divmod(rest, self.num_relations)
            rels.append(r)
        return start, rels

    def _example(self, start: int, rels: list[int]) -> tuple[np.ndarray, np.ndarray]:
        answer = start
        for r in rels:
            answer = int(self.edges[answer, r])
        prompt = [BOS, *(NUM_SHARED_TOKENS + r for r in reversed(rels)), self.entity_base + start, ANS]
        return np.array(prompt, np.int32), np.array([self.entity_base + answer], np.int32)

    def train_example(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        del seed  # a finite set: the pipeline shuffles it
        if index < self.num_facts:
            x, r = divmod(index, self.num_relations)
            return self._example(x, [r])
        return self._example(*self._question(self.train_questions[index - self.num_facts]))

    def eval_set(self, n: int, split: str = "test") -> EvalSet:
        """`n` k-hop questions of the held-out split ("test") or of the training questions ("train")."""
        if split == "test" and self.num_heldout is not None:
            if n > self.num_heldout:
                raise ValueError(f"only {self.num_heldout} held-out questions, asked for {n}")
            qids = self.heldout_questions[:n]
        elif split == "test":
            if n > self.num_questions * self.test_fraction * 0.5:
                raise ValueError(f"at most {int(self.num_questions * self.test_fraction * 0.5)} held-out "
                                 f"questions can be drawn, asked for {n}")
            qids = self._sample_questions(n, heldout=True, stream=2)
        elif split == "train":
            if n > len(self.train_questions):
                raise ValueError(f"only {len(self.train_questions)} training questions, asked for {n}")
            qids = self.train_questions[:n]
        else:
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")
        pairs = [self._example(*self._question(q)) for q in qids]
        return EvalSet(np.stack([p for p, _ in pairs]), np.stack([a for _, a in pairs]))

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        """Walks the graph from the prompt's entity through its relations, innermost first."""
        p = [int(t) for t in prompt]
        rel_tokens, entity = p[1:-2], p[-2] - self.entity_base
        ok = (len(p) >= 4 and p[0] == BOS and p[-1] == ANS and 0 <= entity < self.num_layers * self.entities_per_layer
              and all(NUM_SHARED_TOKENS <= t < self.entity_base for t in rel_tokens))
        if not ok:
            raise ValueError(f"not a multi-hop QA prompt: {self.detokenize(p)}")
        for t in reversed(rel_tokens):
            if entity >= len(self.edges):
                raise ValueError(f"question walks past the last layer: {self.detokenize(p)}")
            entity = int(self.edges[entity, t - NUM_SHARED_TOKENS])
        return np.array([self.entity_base + entity], np.int32)

    def layer_of(self, token: int) -> int:
        """Layer of an entity token."""
        return (int(token) - self.entity_base) // self.entities_per_layer

    def token_name(self, token: int) -> str:
        if token < NUM_SHARED_TOKENS:
            return ("<pad>", "<bos>", "<ans>")[token]
        if token < self.entity_base:
            return f"r{token - NUM_SHARED_TOKENS}"
        if token < self.vocab_size:
            layer, i = divmod(token - self.entity_base, self.entities_per_layer)
            return f"e{layer}_{i}"
        raise ValueError(f"token {token} is outside the task's vocabulary [0, {self.vocab_size})")
