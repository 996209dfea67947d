"""Kernels for the hot path: one entry point per op, each with an XLA reference and Pallas flavors.

- `attention`: training / prefill attention (causal, segment ids, GQA), flash-style, no [S, S].
- `decode_attention`: a query chunk against a KV-cache view plus its own K/V, per-row visible slots.
- `linear_cross_entropy`: per-token CE and argmax of hidden @ head without [N, V] logits.
`impl` is "auto" | "xla" | "pallas" (see `dispatch`).
"""

from ouro_jax.kernels.cross_entropy import linear_cross_entropy, reference_cross_entropy
from ouro_jax.kernels.decode import decode_attention, reference_decode_attention
from ouro_jax.kernels.dispatch import IMPLS, KernelUnavailable, check_impl, choose, mesh_platform
from ouro_jax.kernels.flash import attention, reference_attention

__all__ = ["IMPLS", "KernelUnavailable", "attention", "check_impl", "choose", "decode_attention",
           "linear_cross_entropy", "mesh_platform", "reference_attention", "reference_cross_entropy",
           "reference_decode_attention"]
