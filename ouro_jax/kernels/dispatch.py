"""Choosing a flavor per op call, once: "xla" (what runs by default off TPU/GPU), "reference" (the
test oracle), "tpu" / "gpu" (Pallas kernels), from an `Execution`'s impl for the op.

"auto" follows the platform a program is built for (`resolve_platform`: the Execution's `platform`,
else the platform of the mesh's abstract devices: an AOT compile for TPU on a CPU host gets the TPU
kernels), never the host's default backend, and falls back to XLA with one warning where a kernel
cannot run or does not pay. Forcing "pallas" where a kernel cannot run raises `KernelUnavailable`.
`kernel_interpret` runs kernels in the Pallas interpreter on any platform (tests on CPU); the kernel
flavor then follows the platform ("tpu" unless it names a GPU).

Every op states why a kernel flavor is not used in one shape: `Limits(cannot_run, not_worth)`, each a
reason string or None.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import jax

from ouro_jax.config import KERNEL_IMPLS, Execution

XLA, REFERENCE = "xla", "reference"

_log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


class KernelUnavailable(ValueError):
    """A Pallas kernel was forced where it cannot run (platform, shape or dtype)."""


class Limits(NamedTuple):
    """Why a kernel flavor is not used for one call: `cannot_run` (forced "pallas" raises), `not_worth`
    ("auto" keeps XLA); None where nothing stands in the way."""

    cannot_run: str | None = None
    not_worth: str | None = None


def check_impl(impl: str) -> str:
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"kernel impl must be one of {KERNEL_IMPLS}, got {impl!r}")
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


def resolve_platform(run: Execution) -> str:
    """The platform a program is built for: `run.platform`, or the mesh's when "auto"."""
    return mesh_platform() if run.platform == "auto" else run.platform


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


def choose(op: str, impl: str, platform: str, interpret: bool, limits: Callable[[str], Limits]) -> str:
    """Resolves `impl` for one call of `op` -> "xla", "reference", or the kernel flavor "tpu" / "gpu".

    limits(flavor) says what stands in the way of that kernel flavor; auto falls back to XLA on either
    reason (one warning per op and reason), forced "pallas" raises on `cannot_run`.
    """
    if check_impl(impl) in (XLA, REFERENCE):
        return impl
    flavor = kernel_platform(platform, interpret)
    if flavor is None and impl == "auto":
        return XLA       # auto on a platform without kernels (CPU): XLA is the intended path
    why = (Limits(f"no Pallas kernel for platform {platform!r} (use interpret mode to emulate one)")
           if flavor is None else limits(flavor))
    if impl == "pallas":
        if why.cannot_run:
            raise KernelUnavailable(f"{op}: Pallas kernel forced on {platform!r} but it cannot run: {why.cannot_run}")
        return flavor
    reason = why.cannot_run or why.not_worth
    if reason:
        if (op, reason) not in _warned:
            _warned.add((op, reason))
            _log.warning("%s: falling back to XLA on %s: %s", op, platform, reason)
        return XLA
    return flavor


def choose_for(op: str, impl: str, run: Execution, limits: Callable[[str], Limits]) -> str:
    """`choose` on the platform `run` builds for (see `resolve_platform`)."""
    return choose(op, impl, resolve_platform(run), run.kernel_interpret, limits)
