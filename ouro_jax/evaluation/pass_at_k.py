"""pass@k from n samples per problem (the unbiased estimator of Chen et al., 2021), for lm-eval tasks that
draw `repeats: n` samples: `process_results: !function ...` can return `pass_at_k_results(...)`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import comb


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n (of which `correct`
    are right) is right."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= n and 1 <= k <= n, got n={n} correct={correct} k={k}")
    return 1.0 - comb(n - correct, k) / comb(n, k)


def pass_at_k_results(responses: Sequence[str], is_correct: Callable[[str], bool], ks: Sequence[int]
                      ) -> dict[str, float]:
    """{"pass@k": ...} for each k of `ks` from the n `responses` of one problem."""
    correct = sum(bool(is_correct(r)) for r in responses)
    return {f"pass@{k}": pass_at_k(len(responses), correct, k) for k in ks}
