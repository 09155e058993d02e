"""Language-model weights packed for oneDNN's CPU matmul (bf16, CPUs with bf16 instructions).

``x @ weight.T`` with a plain ``[N, K]`` bf16 weight makes oneDNN re-lay the whole weight into its blocked
(k-pair interleaved) format on every call, so a decode step reads and writes every weight besides multiplying
it. Packed once (``torch.ops.mkldnn._reorder_linear_weight``) the weight is only read: on the CPUs measured a
2-row matmul runs 1.2-3x faster and a 1154-row one (a JanusFlow step) ~1.2x, with bit-identical results
(docs/PERFORMANCE.md).

A packed weight is an opaque oneDNN tensor of the same size as the plain one. The decoder layers' matrices are
packed layer by layer and the plain parameters replaced by :func:`stand_in` s (zero-stride views of one zero,
with the right shape and dtype, holding no memory), so RAM does not grow; ``state_dict`` then reports the right
sizes but not the values, and the weights must be unpacked (:func:`janus_core.llm.cpu_unpack_layers`) before
anything else reads or moves them. Whether this torch and CPU can pack is decided once per process by
:func:`can_pack`: oneDNN refuses bf16 packing on CPUs without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, and a
probe's packed result must equal the plain matmul's.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from .errors import JanusError
from .precision import onednn_ops

logger = logging.getLogger(__name__)

# Rows oneDNN is told to expect when packing (the layout it picks serves every row count; 2 = one CFG pair).
ROWS_HINT = 2
# Self-check probe: ``[N, K]`` weight and the rows multiplied by it.
PROBE_SHAPE = (96, 256)
PROBE_ROWS = 3
# Largest relative deviation from the plain matmul the self-check accepts (the same products and sums in bf16).
CHECK_TOLERANCE = 1e-2


@functools.cache
def _ops() -> tuple | None:
    """(reorder, run) oneDNN ops, looked up once (every decode-step matmul goes through :func:`matmul`)."""
    return onednn_ops("mkldnn", "_reorder_linear_weight", "_linear_pointwise")


@dataclass(frozen=True)
class PackedWeight:
    """A ``[out_features, in_features]`` weight packed for oneDNN (``packed``, opaque) on the CPU."""

    packed: torch.Tensor
    shape: tuple[int, int]

    def dense(self) -> torch.Tensor:
        """The plain ``[out, in]`` weight (a new tensor)."""
        return self.packed.to_dense()


def _required_ops() -> tuple:
    ops = _ops()
    if ops is None:
        raise JanusError("This torch has no oneDNN weight packing (torch.ops.mkldnn); check cpu_packed.can_pack first.")
    return ops


def pack(weight: torch.Tensor) -> PackedWeight:
    """Pack the plain CPU ``weight [N, K]`` (only where :func:`can_pack` said yes for its dtype)."""
    reorder, _ = _required_ops()
    return PackedWeight(reorder(weight.contiguous(), ROWS_HINT), (weight.shape[0], weight.shape[1]))


def matmul(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x [M, K] @ weight.T`` -> a new ``[M, N]`` tensor in ``x``'s dtype."""
    _, run = _required_ops()
    return run(x.contiguous(), weight.packed, None, "none", [], "")


@functools.cache
def can_pack(dtype: torch.dtype) -> bool:
    """Whether language-model weights of ``dtype`` are packed on this machine: bf16 only, where oneDNN packs it
    and a probe's packed matmul agrees with the plain one. Decided and logged once per process."""
    if dtype != torch.bfloat16:
        return False
    if _ops() is None:
        logger.info("CPU matmuls use plain weights: this torch has no oneDNN weight packing")
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(PROBE_SHAPE, generator=gen).to(dtype)
    x = torch.randn(PROBE_ROWS, PROBE_SHAPE[1], generator=gen).to(dtype)
    try:
        got = matmul(x, pack(weight)).float()
    except RuntimeError as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        logger.info("CPU matmuls use plain bf16 weights: oneDNN cannot pack them on this CPU (%s)", reason)
        return False
    expect = (x @ weight.t()).float()
    deviation = float((got - expect).abs().max() / expect.abs().max().clamp(min=1e-12))
    if got.shape != expect.shape or not deviation <= CHECK_TOLERANCE:
        logger.warning("oneDNN's packed bf16 matmul disagrees with the plain one on this CPU (relative deviation "
                       "%.2e); using plain weights", deviation)
        return False
    logger.info("language-model weights are packed for oneDNN's bf16 matmul on this CPU (self-check passed)")
    return True


def stand_in(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` CPU tensor of zeros that holds one element (zero strides): the placeholder of a packed weight."""
    return torch.zeros((), dtype=dtype).expand(shape)


def is_stand_in(t: torch.Tensor) -> bool:
    """Whether ``t`` is a :func:`stand_in` (a multi-element tensor with all-zero strides)."""
    return t.numel() > 1 and all(s == 0 for s in t.stride())


__all__ = ["PackedWeight", "can_pack", "is_stand_in", "matmul", "pack", "stand_in"]
