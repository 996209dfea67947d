"""Mano (SPEC 7): evaluate a random prefix expression over F_p (p = 23) with + - *.

An example with l operators (2l + 1 expression tokens) is
`<bos> <len_l> op/operand tokens... <ans> answer`, e.g. `<bos> <len_2> * + 3 4 5 <ans> 12`
((3 + 4) * 5 mod 23). Training draws l ~ U[1, L]; evaluation uses l = L, the hardest length.
An expression with l operators chooses an operator uniformly, gives its left operand
U[0, l - 1] of the remaining operators (the right one the rest), and draws leaves uniformly
from F_p. Token ids: 0 pad, 1 <bos>, 2 <ans>, 3..3+p-1 the values 0..p-1, then + - *, then
<len_1>..<len_L>; vocab_size = 6 + p + L (39 for L = 10).

Held out by construction: a keyed hash of the expression (its operator and operand tokens, fixed
by `seed`) puts a fraction `heldout_fraction` (default 0.25) of all expressions, of every length, in
the held-out split. Training redraws (from the same example stream) until it gets an expression
outside the split; `eval_set` draws only inside it. No evaluation expression is ever trained on,
however small the space of expressions (`is_heldout` tells for any prompt).

`answer_base=B` (2 <= B <= p) writes the answer as its base-B digits, most significant first and
zero-padded to the digits of p - 1, as the value tokens 0..B-1 (p = 5, B = 2: 3 -> `0 1 1`): a
multi-token answer, generated token by token at decode.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ouro_jax.data.tasks import ANS, BOS, NUM_SHARED_TOKENS, EvalSet, SyntheticTask, example_rng

OPS = ("+", "-", "*")


class Mano(SyntheticTask):
    name = "mano"
    answer_len = 1

    def __init__(self, max_len: int = 10, modulus: int = 23, seed: int = 0, answer_base: int = 0,
                 heldout_fraction: float = 0.25):
        if max_len < 1:
            raise ValueError(f"Mano max_len (operators per expression) must be >= 1, got {max_len}")
        if modulus < 2:
            raise ValueError(f"Mano modulus must be >= 2, got {modulus}")
        if answer_base and not 2 <= answer_base <= modulus:
            raise ValueError(f"Mano answer_base must be 0 (one token) or in [2, modulus], got {answer_base}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"Mano heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.max_len, self.modulus, self.seed, self.answer_base = max_len, modulus, seed, answer_base
        self.heldout_fraction = heldout_fraction
        self.answer_len = 1
        while answer_base and answer_base**self.answer_len < modulus:
            self.answer_len += 1
        self.value_base = NUM_SHARED_TOKENS
        self.op_base = self.value_base + modulus
        self.len_base = self.op_base + len(OPS)  # <len_l> has id len_base + l - 1
        self.vocab_size = self.len_base + max_len
        self.max_example_len = 2 * max_len + 4 + self.answer_len
        self.num_train_examples = None

    def __repr__(self) -> str:
        base = f", answer_base={self.answer_base}" if self.answer_base else ""
        return (f"Mano(max_len={self.max_len}, modulus={self.modulus}, seed={self.seed}{base}, "
                f"heldout_fraction={self.heldout_fraction})")

    def is_heldout(self, prompt: np.ndarray) -> bool:
        """Whether the prompt's expression is in the held-out split (a keyed hash of its expression tokens)."""
        expression = np.asarray(prompt, np.int32)[2:-1].tobytes()
        digest = hashlib.blake2b(expression, digest_size=8, key=f"mano-heldout/{self.seed}".encode()).digest()
        return int.from_bytes(digest, "little") / 2.0**64 < self.heldout_fraction

    def _draw(self, rng, num_ops, heldout: bool) -> tuple[np.ndarray, np.ndarray]:
        """The first expression of `rng` with `num_ops` operators on the requested side of the split."""
        for _ in range(100_000):
            prompt, answer = self._generate(rng, num_ops)
            if self.is_heldout(prompt) == heldout:
                return prompt, answer
        side = "held-out" if heldout else "training"
        raise ValueError(f"no {side} Mano expression with {num_ops} operators in 100000 draws: the space is too "
                         f"small for heldout_fraction={self.heldout_fraction}")

    def answer_tokens(self, value: int) -> np.ndarray:
        """The answer of an expression with `value`: one value token, or its `answer_len` base-B digits."""
        if not self.answer_base:
            return np.array([self.value_base + value], np.int32)
        digits = [value // self.answer_base**i % self.answer_base for i in reversed(range(self.answer_len))]
        return np.array(digits, np.int32) + self.value_base

    def _generate(self, rng, num_ops: int) -> tuple[np.ndarray, np.ndarray]:
        tokens: list[int] = []
        draw, p = rng.random, self.modulus  # int(draw() * n): uniform on [0, n) up to 2^-53, 10x faster than randrange

        def expr(n: int) -> int:
            if n == 0:
                v = int(draw() * p)
                tokens.append(self.value_base + v)
                return v
            op = int(draw() * 3)
            tokens.append(self.op_base + op)
            n_left = int(draw() * n)
            a, b = expr(n_left), expr(n - 1 - n_left)
            return (a + b if op == 0 else a - b if op == 1 else a * b) % p

        value = expr(num_ops)
        prompt = np.array([BOS, self.len_base + num_ops - 1, *tokens, ANS], np.int32)
        return prompt, self.answer_tokens(value)

    def train_example(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = example_rng("mano-train", self.seed, seed, index)
        return self._draw(rng, 1 + int(rng.random() * self.max_len), heldout=False)

    def eval_set(self, n: int) -> EvalSet:
        """`n` held-out expressions with l = max_len (independent draws: a small split repeats expressions)."""
        pairs = [self._draw(example_rng("mano-eval", self.seed, i), self.max_len, heldout=True) for i in range(n)]
        return EvalSet(np.stack([p for p, _ in pairs]), np.stack([a for _, a in pairs]))

    def solve(self, prompt: np.ndarray) -> np.ndarray:
        """Evaluates the prompt's expression with a right-to-left operand stack."""
        p = [int(t) for t in prompt]
        if len(p) < 4 or p[0] != BOS or p[-1] != ANS or not self.len_base <= p[1] < self.vocab_size:
            raise ValueError(f"not a Mano prompt: {self.detokenize(p)}")
        stack: list[int] = []
        for t in reversed(p[2:-1]):
            if self.value_base <= t < self.op_base:
                stack.append(t - self.value_base)
            elif self.op_base <= t < self.len_base and len(stack) >= 2:
                a, b = stack.pop(), stack.pop()
                stack.append({"+": a + b, "-": a - b, "*": a * b}[OPS[t - self.op_base]] % self.modulus)
            else:
                raise ValueError(f"malformed Mano expression: {self.detokenize(p)}")
        num_ops = sum(self.op_base <= t < self.len_base for t in p[2:-1])
        if len(stack) != 1 or num_ops != p[1] - self.len_base + 1:
            raise ValueError(f"malformed Mano expression or wrong length token: {self.detokenize(p)}")
        return self.answer_tokens(stack[0])

    def num_ops(self, prompt: np.ndarray) -> int:
        """l of a prompt, read from its `<len_l>` token."""
        return int(prompt[1]) - self.len_base + 1

    def token_name(self, token: int) -> str:
        if token < NUM_SHARED_TOKENS:
            return ("<pad>", "<bos>", "<ans>")[token]
        if token < self.op_base:
            return str(token - self.value_base)
        if token < self.len_base:
            return OPS[token - self.op_base]
        if token < self.vocab_size:
            return f"<len_{token - self.len_base + 1}>"
        raise ValueError(f"token {token} is outside Mano's vocabulary [0, {self.vocab_size})")
