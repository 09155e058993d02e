"""The weight-only number formats: quantize, dequantize, and the canonical (stored) layout.

A weight ``w [N, K]`` (``N`` outputs, ``K`` inputs) becomes two tensors:

* ``int8``: symmetric per output channel. ``qweight`` int8 ``[N, K]`` in -127..127 and ``qscale`` ``[N]``;
  ``w[n, k] ~ qweight[n, k] * qscale[n]`` with ``qscale[n] = max_k |w[n, k]| / 127``.
* ``int4``: asymmetric per group of ``g`` consecutive inputs (:data:`INT4_GROUP`, smaller when ``K``
  demands, :func:`int4_group_size`). Values ``q`` in 0..15, two per byte: ``qweight`` uint8 ``[N, K / 2]``
  with ``q[n, 2j]`` in the high nibble and ``q[n, 2j + 1]`` in the low one; ``qscale`` ``[N, K / g, 2]``
  holds each group's scale ``s`` and zero ``z``; ``w[n, k] ~ (q[n, k] - 8) * s + z`` with
  ``s = (max - min) / 15`` and ``z = min + 8 s`` over the group. This is the convention of torch's int4
  kernels (``_weight_int4pack_mm*``); the zero point lowers the error by 10-20 % against a symmetric
  grid at no runtime cost (the kernels read a zero either way), see docs in :mod:`janus_core.quant`.

Scales (and zeros) are rounded to bfloat16 before the values are quantized against them, so the stored
format is exact in bfloat16, float16 (for the released models' ranges) and float32 compute alike. Both
layouts are row-major in ``N``: rows of a matrix are contiguous slices of every tensor, which lets joined
matrices (q/k/v, gate/up) be filled part by part. Kernel-specific layouts are made from these at load
(:mod:`janus_core.quant.kernels`).
"""

from __future__ import annotations

import torch

from ..errors import JanusError

MODES = ("int8", "int4")
INT4_GROUP = 128
INT4_GROUPS = (128, 64, 32)  # tried in order: the largest that divides in_features
SCALE_DTYPE = torch.bfloat16
INT8_MAX = 127
INT4_LEVELS = 15
INT4_OFFSET = 8
# Smallest scale: keeps constant rows / groups finite (their values come back exactly as the zero).
MIN_SCALE = 1e-10
# Smallest int4 scale relative to the group's largest magnitude (twice bfloat16's relative rounding of the zero).
ZERO_ROUNDING = 2.0**-8
# Elements quantized per chunk (bounds the float32 temporaries to ~4 x 16 MiB).
CHUNK_ELEMENTS = 1 << 22


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a :class:`JanusError` naming the choices."""
    if mode not in MODES:
        raise JanusError(f"Unknown quantization {mode!r}; choose one of {', '.join(MODES)} (or none).")
    return mode


def int4_group_size(in_features: int) -> int:
    """The int4 group size for a matrix with ``in_features`` inputs: the largest of :data:`INT4_GROUPS` that
    divides it. Raises :class:`JanusError` when none does (the kernels need groups of 32 or more)."""
    for group in INT4_GROUPS:
        if in_features % group == 0:
            return group
    raise JanusError(f"int4 needs the input width to be a multiple of {INT4_GROUPS[-1]} (groups of "
                     f"{'/'.join(map(str, INT4_GROUPS))}); this layer has {in_features}. Use int8 for this model.")


def group_size(mode: str, in_features: int) -> int:
    """Inputs per scale: ``in_features`` for int8 (one scale per row), :func:`int4_group_size` for int4."""
    return in_features if check_mode(mode) == "int8" else int4_group_size(in_features)


def stored_shapes(mode: str, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{"qweight": (shape, dtype), "qscale": (shape, dtype)}`` of the canonical layout of an ``[N, K]`` weight."""
    n, k = out_features, in_features
    if check_mode(mode) == "int8":
        return {"qweight": ((n, k), torch.int8), "qscale": ((n,), SCALE_DTYPE)}
    groups = k // int4_group_size(k)
    return {"qweight": ((n, k // 2), torch.uint8), "qscale": ((n, groups, 2), SCALE_DTYPE)}


def stored_elements(mode: str, out_features: int, in_features: int) -> int:
    """Values the canonical layout of an ``[N, K]`` weight stores (what a safetensors header counts)."""
    total = 0
    for shape, _ in stored_shapes(mode, out_features, in_features).values():
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


def stored_bytes(mode: str, out_features: int, in_features: int) -> int:
    """Bytes of the canonical layout of an ``[N, K]`` weight."""
    total = 0
    for shape, dtype in stored_shapes(mode, out_features, in_features).values():
        count = dtype.itemsize
        for d in shape:
            count *= d
        total += count
    return total


def _rows_per_chunk(in_features: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(in_features, 1))


def quantize_into(weight: torch.Tensor, mode: str, qweight: torch.Tensor, qscale: torch.Tensor) -> None:
    """Quantize the CPU floating ``weight [N, K]`` into the canonical ``qweight`` / ``qscale`` (CPU tensors of
    :func:`stored_shapes`, e.g. row slices of a joined buffer), in row chunks (float32 math)."""
    n, k = weight.shape
    step = _rows_per_chunk(k)
    for first in range(0, n, step):
        rows = slice(first, min(first + step, n))
        w = weight[rows].to(torch.float32, copy=True)
        if mode == "int8":
            scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_(min=MIN_SCALE).to(SCALE_DTYPE)
            q = w.div_(scale.float()[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
            qweight[rows].copy_(q)
            qscale[rows].copy_(scale)
            continue
        group = int4_group_size(k)
        wg = w.view(-1, k // group, group)
        low, high = wg.amin(dim=2), wg.amax(dim=2)
        # At least 1/256 of the group's magnitude: the grid must absorb the bfloat16 rounding of the zero.
        floor = torch.maximum(low.abs(), high.abs()).mul_(ZERO_ROUNDING).clamp_(min=MIN_SCALE)
        scale = torch.maximum((high - low) / INT4_LEVELS, floor).to(SCALE_DTYPE).float()
        zero = (low + INT4_OFFSET * scale).to(SCALE_DTYPE).float()
        q = wg.sub_(zero[..., None]).div_(scale[..., None]).add_(INT4_OFFSET).round_().clamp_(0, INT4_LEVELS)
        q = q.to(torch.uint8).view(-1, k // 2, 2)
        qweight[rows].copy_(q[..., 0] << 4 | q[..., 1])
        qscale[rows].copy_(torch.stack([scale, zero], dim=-1))


def quantize(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight, qscale)`` in the canonical layout for the CPU floating ``weight [N, K]``."""
    shapes = stored_shapes(mode, *weight.shape)
    qweight, qscale = (torch.empty(shape, dtype=dtype) for shape, dtype in shapes.values())
    quantize_into(weight, mode, qweight, qscale)
    return qweight, qscale


def int4_values(qweight: torch.Tensor) -> torch.Tensor:
    """The 0..15 values ``[N, K]`` (uint8) of a canonical int4 ``qweight [N, K / 2]``."""
    return torch.stack([qweight >> 4, qweight & 0xF], dim=-1).view(qweight.shape[0], -1)


def dequantize(qweight: torch.Tensor, qscale: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """The ``[N, K]`` weight in ``dtype`` that a canonical ``qweight`` / ``qscale`` stand for (computed in float32)."""
    if check_mode(mode) == "int8":
        return (qweight.float() * qscale.float()[:, None]).to(dtype)
    values = int4_values(qweight).float()
    n, k = values.shape
    groups = qscale.shape[1]
    scale, zero = qscale[..., 0].float(), qscale[..., 1].float()
    w = values.view(n, groups, k // groups).sub_(INT4_OFFSET).mul_(scale[..., None]).add_(zero[..., None])
    return w.view(n, k).to(dtype)
