"""int8 weights multiplied by oneDNN's integer GEMM (x86 CPUs with VNNI or AMX), the activations split exactly.

The weight stays weight-only quantized: the activations are not rounded to 8 bits. Each row ``x [K]`` with
``s = max |x| / 127`` is written as ``s (a + b / 254)`` with the integers ``a = round(x / s)`` and
``b = round(254 (x / s - a))``, both in -127..127; the difference to ``x`` is at most ``s / 508 =
max |x| / 64516``, below bf16's own rounding of a row's larger entries (2^-9 relative). Both terms go through one
GEMM as ``2 M`` rows of unsigned bytes (zero point 128) against the weight prepacked by oneDNN at load: int32
sums, scaled per output channel inside the GEMM, then ``y = s (y_a + y_b / 254)``.

With VNNI (``vpdpbusd``, AVX-512 or AVX-VNNI) or AMX the byte products accumulate exactly in int32 and one
instruction does twice the multiply-adds of a bf16 one, so the doubled rows cost about what bf16 costs, while
the weight read per step is halved (docs/PERFORMANCE.md). Without VNNI oneDNN adds byte pairs in saturating
int16 and the result is wrong; the load-time self-check (:func:`janus_core.quant.kernels.kernel_for`) sees that
and picks another kernel.

A prepacked weight is an opaque oneDNN tensor of ``N K`` bytes reporting shape ``[K, N]``; :func:`unpack` gives
the canonical ``[N, K]`` int8 values back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import precision
from ..errors import JanusError

ZERO_POINT = 128
# The second term's step relative to the first's (b in -127..127 covers a's rounding error of +-0.5).
SPLIT = 254.0


@functools.cache
def _ops() -> tuple[Callable[..., torch.Tensor], ...] | None:
    """(prepack, run) oneDNN ops, looked up once (every quantized matmul goes through :func:`matmul`)."""
    return precision.onednn_ops("onednn", "qlinear_prepack", "qlinear_pointwise")


def _required_ops() -> tuple[Callable[..., torch.Tensor], ...]:
    ops = _ops()
    if ops is None:
        raise JanusError("This torch has no oneDNN int8 GEMM (torch.ops.onednn); check onednn_int8.available first.")
    return ops


def unavailable_reason() -> str | None:
    """Why the kernel cannot serve on this machine, or None: it needs oneDNN's int8 ops in this torch and an x86
    CPU with VNNI or AMX (:func:`janus_core.precision.int8_dot_product`). The self-check still tests its results."""
    if _ops() is None:
        return "is not in this torch"
    if not precision.int8_dot_product(precision.local_cpu_caps()):
        return "needs an x86 CPU with VNNI or AMX (byte dot products; none on this CPU or under ONEDNN_MAX_CPU_ISA)"
    return None


def available() -> bool:
    """Whether :func:`unavailable_reason` has no objection."""
    return unavailable_reason() is None


@dataclass(frozen=True)
class PackedInt8:
    """An int8 ``[N, K]`` weight as the GEMM reads it: oneDNN's prepacked (opaque) values, the per-output-channel
    scales in float32 and the (zero) weight zero points."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_points: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.scale.device


def pack(qweight: torch.Tensor, qscale: torch.Tensor) -> PackedInt8:
    """Canonical int8 ``qweight [N, K]`` and ``qscale [N]`` on the CPU -> :class:`PackedInt8`."""
    prepack, _ = _required_ops()
    scale = qscale.float()
    return PackedInt8(prepack(qweight.contiguous(), None), scale, torch.zeros(scale.shape, dtype=torch.int32))


def unpack(packed: PackedInt8) -> torch.Tensor:
    """The canonical int8 ``[N, K]`` values of a :func:`pack` ed weight (a new tensor)."""
    return packed.weight.to_dense().t().contiguous()


def split_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (uint8 ``[2 M, K]``: the terms ``a`` then ``b`` of every row plus the zero point, float32
    row scales ``s [M, 1]``), see the module docstring."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / 127.0
    t = xf / scale  # a new tensor: x.float() may be x itself
    a = t.round()
    b = t.sub_(a).mul_(SPLIT).round_()
    return torch.cat([a, b]).add_(ZERO_POINT).to(torch.uint8), scale


def matmul(x: torch.Tensor, packed: PackedInt8) -> torch.Tensor:
    """``x [M, K] @ (qweight * scale[:, None]).T`` -> ``[M, N]`` in ``x``'s dtype."""
    _, run = _required_ops()
    rows = x.shape[0]
    terms, row_scale = split_rows(x)
    y = run(terms, 1.0, ZERO_POINT, packed.weight, packed.scale, packed.zero_points, None, 1.0, 0, torch.float32,
            "none", [], "")
    return torch.add(y[:rows], y[rows:], alpha=1.0 / SPLIT).mul_(row_scale).to(x.dtype)
