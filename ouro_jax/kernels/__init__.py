"""The ops layer: one entry point per hot-path op, each taking the `Execution` settings and choosing its
flavor once (see `dispatch`): xla (what runs off TPU/GPU), reference (the test oracle), Pallas tpu / gpu.

- `attention` (flash.py): training / prefill attention (causal, segment ids, GQA).
- `decode_attention` (decode.py): a query chunk against a KV-cache view plus its own K/V.
- `linear_cross_entropy` / `linear_argmax` (cross_entropy.py): per-token CE / argmax of hidden @ head.
"""

from ouro_jax.kernels.cross_entropy import linear_argmax, linear_cross_entropy
from ouro_jax.kernels.decode import decode_attention
from ouro_jax.kernels.dispatch import KernelUnavailable, Limits, mesh_platform, resolve_platform
from ouro_jax.kernels.flash import attention

__all__ = ["KernelUnavailable", "Limits", "attention", "decode_attention", "linear_argmax", "linear_cross_entropy",
           "mesh_platform", "resolve_platform"]
