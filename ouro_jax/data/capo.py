"""Capo (SPEC 7): synthetic biographies whose knowledge content is known exactly, for capacity in bits.

After Physics of Language Models 3.3 (bioD): `num_people` individuals, each with a distinct name of
`name_tokens` tokens drawn from `name_vocab` name parts, and `num_attributes` attributes, each value
uniform over `values_per_attribute` choices (per attribute its own value tokens). A biography is the list
of a person's facts; a training example is one fact, `<bos> name... attr <ans> value`, loss on the value.
Every fact is trained on: Capo measures how much of a finite set a model stores, not generalization, so
`eval_set` returns training facts.

Knowledge in bits (the paper's bound with C = 1 chunk per value and names given in the prompt, so
without its name and value-diversity terms): for each attribute a with D_a values and the model's mean
cross-entropy loss_a (nats) on its value over all N people,
    bits = sum_a N * (log2 D_a - loss_a / ln 2)     (each attribute's term floored at 0),
at most N * K * log2 D when every value is predicted with certainty; `capacity_bits(losses)`.

Token ids: 0 pad, 1 <bos>, 2 <ans>, then K attribute tokens, then K * D value tokens, then name parts.
"""

from __future__ import annotations

import numpy as np

from ouro_jax.data.tasks import ANS, BOS, NUM_SHARED_TOKENS, EvalSet, SyntheticTask


class Capo(SyntheticTask):
    name = "capo"
    answer_len = 1

    def __init__(self, num_people: int = 1000, num_attributes: int = 4, values_per_attribute: int = 32,
                 name_tokens: int = 3, name_vocab: int = 32, seed: int = 0):
        if num_people < 1 or num_attributes < 1 or values_per_attribute < 2 or name_tokens < 1 or name_vocab < 2:
            raise ValueError("Capo needs num_people >= 1, num_attributes >= 1, values_per_attribute >= 2, "
                             "name_tokens >= 1 and name_vocab >= 2")
        if num_people > name_vocab**name_tokens:
            raise ValueError(f"{num_people} people need distinct names: at most name_vocab ** name_tokens = "
                             f"{name_vocab**name_tokens}")
        self.num_people, self.num_attributes, self.seed = num_people, num_attributes, seed
        self.values_per_attribute, self.name_tokens, self.name_vocab = values_per_attribute, name_tokens, name_vocab
        self.value_base = NUM_SHARED_TOKENS + num_attributes
        self.name_base = self.value_base + num_attributes * values_per_attribute
        self.vocab_size = self.name_base + name_vocab
        self.max_example_len = name_tokens + 4
        rng = np.random.default_rng([seed, 7])
        ids = rng.choice(name_vocab**name_tokens, size=num_people, replace=False)
        digits = [ids // name_vocab**i % name_vocab for i in reversed(range(name_tokens))]
        self.names = np.stack(digits, axis=1).astype(np.int32) + self.name_base          # [N, name_tokens]
        self.values = rng.integers(0, values_per_attribute, size=(num_people, num_attributes))  # [N, K]
        self.num_train_examples = num_people * num_attributes
        self._answer = {(self.names[i].tobytes(), a): int(self.values[i, a]) for i in range(num_people)
                        for a in range(num_attributes)}

    def __repr__(self) -> str:
        return (f"Capo(num_people={self.num_people}, num_attributes={self.num_attributes}, values_per_attribute="
                f"{self.values_per_attribute}, name_tokens={self.name_tokens}, name_vocab={self.name_vocab}, "
                f"seed={self.seed})")

    @property
    def total_bits(self) -> float:
        """The knowledge content of the whole set: N * K * log2 D."""
        return self.num_people * self.num_attributes * float(np.log2(self.values_per_attribute))

    def fact(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Fact `index` = person * K + attribute: (prompt, answer)."""
        person, attribute = divmod(int(index), self.num_attributes)
        prompt = np.array([BOS, *self.names[person], NUM_SHARED_TOKENS + attribute, ANS], np.int32)
        value = self.value_base + attribute * self.values_per_attribute + self.values[person, attribute]
        return prompt, np.array([value], np.int32)

    def train_example(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        del seed  # a finite set: the pipeline shuffles it
        return self.fact(index)

    def eval_set(self, n: int) -> EvalSet:
        """The first `n` facts (people in order, all attributes of each): training facts by design."""
        if not 1 <= n <= self.num_train_examples:
            raise ValueError(f"Capo has {self.num_train_examples} facts, asked for {n}")
        pairs = [self.fact(i) for i in range(n)]
        return EvalSet(np.stack([p for p, _ in pairs]), np.stack([a for _, a in pairs]))

    def attribute_of(self, prompt: np.ndarray) -> int:
        return int(prompt[-2]) - NUM_SHARED_TOKENS

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        p = np.asarray(prompt, np.int32)
        key = (p[1:-2].tobytes(), int(p[-2]) - NUM_SHARED_TOKENS) if len(p) == self.name_tokens + 3 else None
        if key is None or p[0] != BOS or p[-1] != ANS or key not in self._answer:
            raise ValueError(f"not a Capo fact prompt: {self.detokenize(p)}")
        return np.array([self.value_base + key[1] * self.values_per_attribute + self._answer[key]], np.int32)

    def capacity_bits(self, value_losses: np.ndarray) -> float:
        """Bits stored, from the mean CE (nats) on the value of each attribute over all people, [K]."""
        losses = np.asarray(value_losses, np.float64)
        if losses.shape != (self.num_attributes,):
            raise ValueError(f"expected one mean loss per attribute, [{self.num_attributes}], got {losses.shape}")
        per_attribute = np.log2(self.values_per_attribute) - losses / np.log(2)
        return float(self.num_people * np.maximum(per_attribute, 0.0).sum())

    def token_name(self, token: int) -> str:
        if token < NUM_SHARED_TOKENS:
            return ("<pad>", "<bos>", "<ans>")[token]
        if token < self.value_base:
            return f"a{token - NUM_SHARED_TOKENS}"
        if token < self.name_base:
            attribute, value = divmod(token - self.value_base, self.values_per_attribute)
            return f"a{attribute}={value}"
        if token < self.vocab_size:
            return f"n{token - self.name_base}"
        raise ValueError(f"token {token} is outside Capo's vocabulary [0, {self.vocab_size})")
