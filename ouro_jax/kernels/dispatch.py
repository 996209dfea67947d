"""Choosing an implementation per op: "xla" (the reference), "pallas" (a kernel) or "auto".

"auto" follows the platform of the mesh a program is built for (its abstract devices: an AOT compile
for TPU on a CPU host gets the TPU kernels), never the host's default backend, and falls back to XLA
with one warning where a kernel cannot run or does not pay. Forcing "pallas" where a kernel cannot run
raises `KernelUnavailable`. `interpret=True` runs kernels in the Pallas interpreter on any platform
(tests on CPU); the kernel flavor then follows `platform` ("tpu" unless told otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax

IMPLS = ("auto", "xla", "pallas")
KERNEL_PLATFORMS = ("tpu", "gpu")

_log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


class KernelUnavailable(ValueError):
    """A Pallas kernel was forced where it cannot run (platform, shape or dtype)."""


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    return impl


def mesh_platform(mesh=None) -> str:
    """The device platform of `mesh`, else of the mesh in context, else of the default device.

    Mesh devices of an AOT topology report their own platform ("tpu") on a CPU host.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.devices.flat[0].platform
    if mesh is not None and not mesh.empty:
        return mesh.abstract_device.platform
    return jax.devices()[0].platform


def kernel_platform(platform: str, interpret: bool) -> str | None:
    """The kernel flavor for `platform`: "tpu" (Mosaic), "gpu" (Triton) or None (no kernel).

    CUDA and ROCm devices report "gpu"; in interpret mode any host runs the TPU flavor unless the
    platform itself names a GPU.
    """
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu" or interpret:
        return "tpu"
    return None


def choose(op: str, impl: str, platform: str, interpret: bool, cannot_run: Callable[[str], str | None],
           not_worth: Callable[[str], str | None] = lambda _: None) -> str | None:
    """Resolves `impl` for one call of `op` -> the kernel flavor ("tpu"/"gpu") or None for XLA.

    cannot_run(flavor) / not_worth(flavor) return a reason or None; auto falls back to XLA on either
    (one warning per op and reason), forced "pallas" raises on the first.
    """
    check_impl(impl)
    if impl == "xla":
        return None
    flavor = kernel_platform(platform, interpret)
    reason = (f"no Pallas kernel for platform {platform!r} (use interpret mode to emulate one)"
              if flavor is None else cannot_run(flavor))
    if impl == "pallas":
        if reason:
            raise KernelUnavailable(f"{op}: Pallas kernel forced on {platform!r} but it cannot run: {reason}")
        return flavor
    if flavor is None:
        return None       # auto on a platform without kernels (CPU): XLA is the intended path
    reason = reason or not_worth(flavor)
    if reason:
        if (op, reason) not in _warned:
            _warned.add((op, reason))
            _log.warning("%s: falling back to XLA on %s: %s", op, platform, reason)
        return None
    return flavor
