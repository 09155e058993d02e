"""Matmuls with weight-only quantized weights: torch's own kernels where the device has them, a correct
dequantize-then-matmul path everywhere, and the load-time self-check that decides between them.

Kernels (``torch.ops.aten``, semantics checked on torch 2.13; the self-check re-checks them on every machine):

* ``_weight_int8pack_mm(x [M, K], qweight int8 [N, K], scale [N])`` -> ``x @ (qweight * scale).T`` in
  ``x``'s dtype (CPU, CUDA, MPS; ``scale`` in ``x``'s dtype). Reads the canonical int8 layout.
* ``_weight_int4pack_mm_for_cpu(x, packed uint8 [N, K / 2], group, scale_zeros [K / g, N, 2])``: packed by
  ``_convert_weight_to_int4pack_for_cpu(int32 [N, K] values, ...)`` into a layout that depends on the CPU
  (blocks of 64 rows on AVX-512, 32 on AVX2), so it is made at load, never stored. ``w = (q - 8) s + z``.
* :func:`.built_kernels.matmul` (CPU, tried first for int4 and int8): C kernels built at first use on Linux x86-64
  CPUs with AVX2, the best variant the CPU has per mode (AMX tiles, AVX512-BF16 dot products, 16-bit integer dot
  products on AVX512-VNNI / AVX-VNNI / AVX2), multiplying the integer weights (layouts ``built-int4`` /
  ``built-int8``, made at load); faster than the stock kernels, and than bf16 up to ~32-200 rows, about bf16's speed
  beyond. Their rows do not depend on how many rows are multiplied together, so they serve every row count.
* ``_weight_int4pack_mm(x bf16, tiled int32, group, scale_zeros)`` (CUDA sm80+, MPS): tiled by
  ``_convert_weight_to_int4pack(uint8 [N, K / 2] with the even input in the high nibble, inner_k_tiles)``.
* :func:`.onednn_int8.matmul` (CPU, tried first for int8): oneDNN's integer GEMM on a weight prepacked at load
  (layout ``onednn-int8``), the activations split exactly into two 8-bit terms; offered only on x86 CPUs with
  VNNI or AMX (:func:`janus_core.precision.int8_dot_product`; the self-check still tests it), and there about as
  fast as bf16 at 32 rows and ~1.9x faster at 2.

torch's weight-only kernels are fast for few rows (an AR decode step: 2 rows per image) and slow for many (on
this project's 2-core AVX-512 CPU ``_weight_int8pack_mm`` costs 2x a bf16 matmul at 32 rows, and in float32 /
float16 40x); the oneDNN one loses from a few hundred rows, where its doubled rows cost more than converting the
weights. Above :attr:`Kernel.max_rows` rows, and for dtypes a kernel does not serve well, the weight is
dequantized in chunks that stay in the cache (never a whole bf16 copy of a layer) and multiplied with the
dtype's ordinary matmul. That path is also the fallback where no kernel exists or the self-check fails.

:func:`kernel_for` runs the self-check once per (device, mode, dtype): it quantizes a small random matrix,
packs it as the kernel wants and compares the kernel's output with the dequantize-then-matmul result (a few
milliseconds). A kernel that is missing, raises or disagrees is logged and the next one tried; when none is
left, the fallback serves, or :class:`JanusError` is raised when the caller does not allow the fallback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .. import precision
from ..errors import JanusError
from . import built_kernels, formats, onednn_int8
from .formats import INT4_OFFSET, int4_values
from .onednn_int8 import PackedInt8

logger = logging.getLogger(__name__)

PLAIN = "plain"
DEQUANTIZE = "dequantize-then-matmul"
CPU_INT4 = "cpu-int4"
TILED_INT4 = "tiled-int4"
ONEDNN_INT8 = "onednn-int8"
# The kernel of janus_core.quant.onednn_int8 (not an aten op).
ONEDNN_KERNEL = "onednn int8 GEMM (activations split in two terms)"
BUILT_INT4 = "built-int4"
BUILT_INT8 = "built-int8"
BUILT_LAYOUTS = (BUILT_INT4, BUILT_INT8)
# The kernels of janus_core.quant.built_kernels (built on this machine).
BUILT_INT4_KERNEL = "int4 kernel built here"
BUILT_INT8_KERNEL = "int8 kernel built here"

# Weight elements dequantized per chunk of the dequantize-then-matmul path in bf16 / fp16 (8 MiB; float32 chunks,
# on CPUs that emulate bf16, use precision.FP32_CHUNK_ELEMENTS: int8 at 32 rows on AVX2 kernels 9.4 ms per
# 11264 x 2048 layer in 4 MiB chunks, 11.9 in 16 MiB ones; in bf16 8 MiB beat 2 MiB, 2.95 vs 3.63 ms).
DEQUANT_CHUNK = 1 << 22
# Weight elements packed per call of the CPU int4 packing op (its int32 input: 32 MiB).
PACK_CHUNK = 1 << 23
# Self-check probe: a matrix every kernel accepts (rows a multiple of 64, two int4 groups of 128) and its rows.
PROBE_SHAPE = (192, 256)
PROBE_ROWS = 3
# max_rows of a kernel that serves every row count.
ALL_ROWS = 1 << 30
# Largest relative deviation (max |kernel - reference| / max |reference|) the self-check accepts, per dtype.
CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _aten(name: str) -> Callable[..., torch.Tensor] | None:
    return getattr(torch.ops.aten, name, None)


@dataclass(frozen=True)
class Kernel:
    """One weight-only matmul op: the ``mode`` and weight ``layout`` it reads, where it runs, and up to how many
    rows it beats dequantize-then-matmul (``max_rows``; measured, see the module docstring)."""

    name: str
    mode: str
    layout: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_rows: int

    @property
    def op(self) -> Callable[..., torch.Tensor] | None:
        if self.name == DEQUANTIZE:
            return None
        if self.name == ONEDNN_KERNEL:
            return onednn_int8.matmul if onednn_int8.available() else None
        if self.layout in BUILT_LAYOUTS:
            return built_kernels.matmul if built_kernels.available(self.mode) else None
        return _aten(self.name)

    def missing(self) -> str:
        """Why :attr:`op` is None."""
        if self.name == ONEDNN_KERNEL:
            return onednn_int8.unavailable_reason() or "is not available"
        if self.layout in BUILT_LAYOUTS:
            return built_kernels.unavailable_reason(self.mode) or "is not available"
        return "is not in this torch"

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        usable = self.name == DEQUANTIZE or self.op is not None
        return usable and device.type in self.device_types and dtype in self.dtypes

    def fits(self, out_features: int, in_features: int) -> bool:
        """Whether the kernel takes a matrix of this shape (int4 packing needs row counts in whole tiles)."""
        if self.layout == CPU_INT4:
            return out_features % 16 == 0
        if self.layout in BUILT_LAYOUTS:
            return built_kernels.fits(self.mode, out_features, in_features)
        if self.layout == TILED_INT4:
            return out_features % 8 == 0 and in_features % 32 == 0
        return True

    def run(self, x: torch.Tensor, qweight: torch.Tensor | PackedInt8, qscale: torch.Tensor, group: int
            ) -> torch.Tensor:
        """``x [M, K]`` times the weight in this kernel's layout -> ``[M, N]`` in ``x``'s dtype."""
        if self.layout == ONEDNN_INT8:  # called directly: availability was settled when the kernel was chosen
            return onednn_int8.matmul(x, qweight)  # the packed weight holds its scales
        if self.layout in BUILT_LAYOUTS:
            return built_kernels.matmul(x, qweight, qscale, self.mode)
        if self.mode == "int8":
            return self.op(x, qweight, qscale)
        return self.op(x, qweight, group, qscale)


# In order of preference per (device type, mode). torch's CPU kernels serve bfloat16 only: in float16 / float32
# they are 10-40x slower than dequantize-then-matmul on the machines measured, which is therefore chosen there
# (the DEQUANTIZE entries); the oneDNN int8 GEMM takes float32 activations whatever the dtype. max_rows: measured
# by bench/quant.py (oneDNN int8 vs dequantizing its layout, 11264 x 2048 on AVX-512: 26 vs 30 ms at 384 rows,
# 48 vs 37 ms at 512). The built kernels serve every row count: AVX512-BF16 int4 ~6-10 % slower than a bf16 matmul
# from 256 rows (11008 x 4096 on Zen 5: 160 vs 144 ms at 1200 rows), AMX int4 / int8 0.8-1.3x bf16 at 512 rows,
# about what dequantizing would add, and their rows then never depend on how many are multiplied together.
KERNELS = (
    Kernel(BUILT_INT8_KERNEL, "int8", BUILT_INT8, ("cpu",), (torch.bfloat16,), ALL_ROWS),
    Kernel(ONEDNN_KERNEL, "int8", ONEDNN_INT8, ("cpu",), (torch.bfloat16, torch.float16, torch.float32), 384),
    Kernel("_weight_int8pack_mm", "int8", PLAIN, ("cpu",), (torch.bfloat16,), 8),
    Kernel(BUILT_INT4_KERNEL, "int4", BUILT_INT4, ("cpu",), (torch.bfloat16,), ALL_ROWS),
    Kernel("_weight_int4pack_mm_for_cpu", "int4", CPU_INT4, ("cpu",), (torch.bfloat16,), 256),
    Kernel(DEQUANTIZE, "int8", PLAIN, ("cpu",), (torch.float16, torch.float32), 0),
    Kernel(DEQUANTIZE, "int4", PLAIN, ("cpu",), (torch.float16, torch.float32), 0),
    Kernel("_weight_int8pack_mm", "int8", PLAIN, ("cuda", "mps"), (torch.bfloat16, torch.float16, torch.float32), 64),
    Kernel("_weight_int4pack_mm", "int4", TILED_INT4, ("cuda",), (torch.bfloat16,), ALL_ROWS),
    Kernel("_weight_int4pack_mm", "int4", TILED_INT4, ("mps",), (torch.bfloat16, torch.float16), ALL_ROWS),
)


def _inner_k_tiles(in_features: int) -> int:
    """The widest k-tiling of the tiled int4 layout that ``in_features`` allows."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


@functools.cache
def cpu_int4_blocks() -> tuple[int, tuple[int, ...]] | None:
    """How ``_convert_weight_to_int4pack_for_cpu`` lays out whole blocks of rows on this CPU: ``(rows per block
    B, row of each nibble within a block)``, found by packing a probe whose values encode their own position.

    Within a block, bytes run over the inputs ``k`` with ``B / 2`` bytes (``B`` nibbles, low first) per input.
    The answer is checked by unpacking a random matrix of another shape; None when the packing does not follow
    the pattern (then many-row matmuls use the kernel as well).
    """
    pack_op = _aten("_convert_weight_to_int4pack_for_cpu")
    if pack_op is None:
        return None
    n, k = 128, 64
    index = torch.arange(n * k).view(n, k)
    source = torch.zeros(n * k, dtype=torch.long)
    try:
        for digit in range(4):  # n * k < 16**4: four 4-bit digits name every position
            packed = pack_op(((index >> (4 * digit)) & 0xF).int(), 2).reshape(-1)
            source += torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).long() << (4 * digit)
        rows, cols = source // k, source % k
        block = int((cols == 0).long().cumprod(0).sum())
        order = tuple(rows[:block].tolist())
        if block == 0 or 192 % block or sorted(order) != list(range(block)):
            return None
        values = torch.randint(0, 16, (192, 256), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        unpacked = _unpack_blocks(pack_op(values, 2), (block, order), slice(0, 192), 256)
    except RuntimeError:
        return None
    return (block, order) if torch.equal(unpacked.int(), values) else None


def _unpack_blocks(packed: torch.Tensor, blocks: tuple[int, tuple[int, ...]], rows: slice, in_features: int
                   ) -> torch.Tensor:
    """The 0..15 values ``[len(rows), K]`` of rows ``rows`` (whole blocks) of a CPU-packed int4 weight.

    The two layouts seen (AVX-512 / AVX2: byte ``j`` holds rows ``j`` and ``j + B / 2``; the default build:
    rows ``2j`` and ``2j + 1``) need no gather; any other order found by :func:`cpu_int4_blocks` is gathered.
    """
    block, order = blocks
    half, k = block // 2, in_features
    flat = packed.view(-1)[rows.start * k // 2: rows.stop * k // 2].view(-1, k, half)
    low, high = flat & 0xF, flat >> 4
    if order[0::2] == tuple(range(half)) and order[1::2] == tuple(range(half, block)):
        by_row = torch.cat([low, high], dim=2)
    else:
        by_row = torch.stack([low, high], dim=-1).view(-1, k, block)
        if order != tuple(range(block)):
            by_row = by_row.index_select(2, torch.tensor(order, device=packed.device).argsort())
    return by_row.transpose(1, 2).reshape(-1, k)


def _pack_cpu_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The CPU kernel's packing of a canonical int4 ``qweight [N, K / 2]``. The op takes int32 values (8x the
    packed bytes), so whole blocks of rows are packed at a time when the layout is known to keep blocks apart
    (:func:`cpu_int4_blocks`): a 102400-row ``lm_head`` never needs its 1.7 GB int32 copy."""
    op = _aten("_convert_weight_to_int4pack_for_cpu")
    n, half = qweight.shape
    blocks = cpu_int4_blocks()
    if blocks is None or n % blocks[0]:
        return op(int4_values(qweight).int(), 2)
    step = max(1, PACK_CHUNK // (2 * half) // blocks[0]) * blocks[0]
    packed = torch.empty(n, half, dtype=torch.uint8)
    for first in range(0, n, step):
        rows = slice(first, min(first + step, n))
        packed[rows] = op(int4_values(qweight[rows]).int(), 2)
    return packed


def pack(qweight: torch.Tensor, qscale: torch.Tensor, mode: str, layout: str, dtype: torch.dtype
         ) -> tuple[torch.Tensor | PackedInt8, torch.Tensor]:
    """Canonical ``qweight`` / ``qscale`` (on the target device) -> the tensors of ``layout``, scales in ``dtype``."""
    if layout == PLAIN:
        return qweight, qscale.to(dtype)
    if layout == ONEDNN_INT8:
        return onednn_int8.pack(qweight, qscale), qscale.to(dtype)
    if layout in BUILT_LAYOUTS:
        return built_kernels.pack(qweight, qscale.to(dtype), mode)
    scale_zeros = qscale.to(dtype).transpose(0, 1).contiguous()  # [K / g, N, 2]
    if layout == CPU_INT4:
        packed = _pack_cpu_int4(qweight)
    else:
        packed = _aten("_convert_weight_to_int4pack")(qweight.contiguous(), _inner_k_tiles(qweight.shape[1] * 2))
    return packed, scale_zeros


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight as a matmul needs it: tensors in ``layout``, the kernel
    chosen for them (None: dequantize-then-matmul only) and the int4 ``group``."""

    qweight: torch.Tensor | PackedInt8
    qscale: torch.Tensor
    mode: str
    layout: str
    kernel: Kernel | None
    group: int
    shape: tuple[int, int]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the scales are kept in it)."""
        return self.qscale.dtype

    def rows(self, start: int, stop: int) -> WeightRows:
        return WeightRows(self, start, stop)

    def readable(self) -> bool:
        """Whether the dequantize-then-matmul path can read this layout back (not the tiled int4 or the built
        kernels' ones)."""
        if self.layout in BUILT_LAYOUTS:
            return False
        if self.mode == "int8" or self.layout == PLAIN:
            return True
        blocks = cpu_int4_blocks() if self.layout == CPU_INT4 else None
        return blocks is not None and self.shape[0] % blocks[0] == 0

    def dequantize_rows(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """Weight rows ``rows`` into ``out [len(rows), K]`` (its dtype; int8 values without their scale, see
        :func:`_dequantized_matmul`). Only for :meth:`readable` layouts other than the oneDNN int8 one (see
        :func:`_dequantized_chunks`)."""
        k = self.shape[1]
        if self.mode == "int8":
            return out.copy_(self.qweight[rows])
        if self.layout == PLAIN:
            pairs = out.view(-1, k // 2, 2)
            packed = self.qweight[rows]
            pairs[..., 0].copy_(packed >> 4)
            pairs[..., 1].copy_(packed & 0xF)
            scale_zero = self.qscale[rows]  # [m, K / g, 2]
        else:
            out.copy_(_unpack_blocks(self.qweight, cpu_int4_blocks(), rows, k))
            scale_zero = self.qscale[:, rows].transpose(0, 1)
        groups = scale_zero.shape[1]
        w = out.view(-1, groups, k // groups).sub_(INT4_OFFSET)
        w.mul_(scale_zero[..., :1].to(out.dtype)).add_(scale_zero[..., 1:].to(out.dtype))
        return out


@dataclass(frozen=True)
class WeightRows:
    """Rows ``[start, stop)`` of a joined :class:`QuantizedWeight` (q of a joined q/k/v, ...)."""

    parent: QuantizedWeight
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stop - self.start, self.parent.shape[1])


def join(parts: tuple[QuantizedWeight | WeightRows, ...]) -> QuantizedWeight | None:
    """The joined weight when ``parts`` are consecutive :class:`WeightRows` covering one parent, else None."""
    first = parts[0]
    if not isinstance(first, WeightRows):
        return None
    offset = 0
    for part in parts:
        if not isinstance(part, WeightRows) or part.parent.qweight is not first.parent.qweight or part.start != offset:
            return None
        offset = part.stop
    return first.parent if offset == first.parent.shape[0] else None


def _block_rows(w: QuantizedWeight, elements: int) -> int:
    """Weight rows per dequantized chunk of about ``elements`` values (whole CPU int4 blocks, so that chunks
    unpack on their own)."""
    blocks = cpu_int4_blocks() if w.layout == CPU_INT4 else None
    align = blocks[0] if blocks else 1
    return max(align, elements // w.shape[1] // align * align)


def _dequantized_chunks(w: QuantizedWeight, step: int, dtype: torch.dtype
                        ) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, their weights [len(rows), K] in dtype)`` for consecutive spans of ``step`` rows, dequantized into
    one reused buffer (int8: without the scale). The oneDNN int8 layout reads back as ``[K, N]``, so its chunks are
    column blocks of that, used transposed (transposing the whole matrix costs 3x more)."""
    n, k = w.shape
    spans = [slice(first, min(first + step, n)) for first in range(0, n, step)]
    if w.layout == ONEDNN_INT8:
        transposed = w.qweight.weight.to_dense()
        buffer = torch.empty(k, min(step, n), dtype=dtype, device=w.device)
        for span in spans:
            yield span, buffer[:, : span.stop - span.start].copy_(transposed[:, span]).t()
        return
    buffer = torch.empty(min(step, n), k, dtype=dtype, device=w.device)
    for span in spans:
        yield span, w.dequantize_rows(span, buffer[: span.stop - span.start])


def _dequantized_matmul(x: torch.Tensor, w: QuantizedWeight, cpu_class: str | None) -> torch.Tensor:
    """``x [M, K] @ w.T`` ``[M, N]`` in ``x``'s dtype by dequantizing ``w`` chunk by chunk into one reused buffer
    (never a whole copy of the layer). ``w`` must be :meth:`~QuantizedWeight.readable`.

    Each chunk is multiplied in the form :func:`janus_core.precision.matmul_form` picks for ``M`` rows on
    ``cpu_class``: ``x @ chunk.T`` into ``[M, N]``, or ``chunk @ x.T`` into ``[N, M]`` returned transposed;
    chunks are dequantized to float32 where it says ``x``'s dtype has no fast matmul for this many rows
    (bfloat16 on CPUs that emulate it).
    """
    n, k = w.shape
    rows = x.shape[0]
    device = x.device.type
    form = precision.matmul_form(x.dtype, rows, device, cpu_class)
    work = x.dtype
    if form == precision.FP32_CHUNKS:
        work = torch.float32
        form = precision.matmul_form(work, rows, device, cpu_class)
    by_row = form == precision.X_WT
    xw = x.to(work)
    out = torch.empty((rows, n) if by_row else (n, rows), dtype=work, device=x.device)
    step = _block_rows(w, precision.FP32_CHUNK_ELEMENTS if work == torch.float32 else DEQUANT_CHUNK)
    for span, chunk in _dequantized_chunks(w, step, work):
        if by_row:
            torch.mm(xw, chunk.t(), out=out[:, span])
        else:
            torch.mm(chunk, xw.t(), out=out[span])
    if w.mode == "int8":
        scale = w.qscale.to(work)
        out.mul_(scale if by_row else scale[:, None])
    out = out if by_row else out.t()
    return out.to(x.dtype)


def matmul(x: torch.Tensor, weight: QuantizedWeight | WeightRows, cpu_class: str | None = None) -> torch.Tensor:
    """``x [M, K]`` times the quantized ``weight [N, K]`` transposed -> ``[M, N]`` in ``x``'s dtype (possibly a
    transposed view). The kernel serves up to its ``max_rows`` rows, dequantize-then-matmul the rest (in the
    matmul form of ``cpu_class``, :func:`janus_core.precision.bf16_class`'s answer; default: this machine's)."""
    if isinstance(weight, WeightRows):
        return matmul(x, weight.parent, cpu_class)[:, weight.start:weight.stop]
    kernel = weight.kernel
    if (kernel is None or x.shape[0] > kernel.max_rows) and weight.readable():
        return _dequantized_matmul(x, weight, precision.cpu_class_for(x.device.type, cpu_class))
    if kernel is None:
        raise JanusError(f"internal: no way to multiply by a {weight.layout} {weight.mode} weight")
    return kernel.run(x.contiguous(), weight.qweight, weight.qscale, weight.group)


def _self_check(kernel: Kernel, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``kernel`` agrees with dequantize-then-matmul on a probe, else why not."""
    gen = torch.Generator().manual_seed(0)
    n, k = PROBE_SHAPE
    weight = torch.randn(n, k, generator=gen) * 0.02
    x = torch.randn(PROBE_ROWS, k, generator=gen)
    # Largest products everywhere in one output: integer kernels that add byte products in saturating 16 bits
    # (oneDNN's int8 GEMM without VNNI) cannot get it right.
    weight[0], x[0] = 0.02, 1.0
    x = x.to(device=device, dtype=dtype)
    qweight, qscale = formats.quantize(weight, kernel.mode)
    group = formats.group_size(kernel.mode, k)
    reference = x.float() @ formats.dequantize(qweight, qscale, kernel.mode).to(device).t()
    try:
        packed, scales = pack(qweight.to(device), qscale.to(device), kernel.mode, kernel.layout, dtype)
        got = kernel.run(x, packed, scales, group).float()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    if got.shape != reference.shape:
        return f"output shape {list(got.shape)} instead of {list(reference.shape)}"
    deviation = float((got - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
    tolerance = CHECK_TOLERANCE.get(dtype, 3e-2)
    if not deviation <= tolerance:
        return f"its result deviates by {deviation:.2e} (relative), more than {tolerance:.0e}"
    return None


@dataclass(frozen=True)
class Choice:
    """What :func:`kernel_for` decided for a (device, mode, dtype): a kernel, or None (dequantize-then-matmul),
    and whether that is a ``fallback`` (no kernel passed) rather than the measured better path."""

    kernel: Kernel | None
    reason: str
    fallback: bool = False

    @property
    def layout(self) -> str:
        return self.kernel.layout if self.kernel else PLAIN


_CHOICES: dict[tuple[str, int | None, str, torch.dtype], Choice] = {}


def forget_choices() -> None:
    """Drop this process's kernel decisions (and whether the built kernels load), so that the next
    :func:`kernel_for` decides again: after changing what is available (``JANUS_NATIVE_KERNELS``, a fake kernel)."""
    _CHOICES.clear()
    built_kernels.forget()


@contextlib.contextmanager
def stock_kernels() -> Iterator[None]:
    """Inside, kernels are chosen with the built ones turned off (``JANUS_NATIVE_KERNELS=0``): weights quantized
    inside get the stock kernels' layouts. Decisions are made afresh on entry and exit; models loaded before keep
    their kernels."""
    before = os.environ.get(built_kernels.SWITCH)
    os.environ[built_kernels.SWITCH] = "0"
    forget_choices()
    try:
        yield
    finally:
        if before is None:
            del os.environ[built_kernels.SWITCH]
        else:
            os.environ[built_kernels.SWITCH] = before
        forget_choices()


def kernel_for(device: torch.device, mode: str, dtype: torch.dtype, *, fallback: bool = True) -> Choice:
    """The kernel for ``mode`` weights multiplied in ``dtype`` on ``device``, self-checked once per process.

    ``fallback=False`` raises :class:`JanusError` instead of settling for dequantize-then-matmul when no kernel
    passes (missing op, unsupported device or dtype, wrong result).
    """
    formats.check_mode(mode)
    key = (device.type, device.index, mode, dtype)
    choice = _CHOICES.get(key)
    if choice is None:
        candidates = [k for k in KERNELS if k.mode == mode and device.type in k.device_types]
        problems = []
        self_check_failed = False
        for kernel in candidates:
            if kernel.name == DEQUANTIZE:
                if kernel.available(device, dtype):
                    choice = Choice(None, f"{DEQUANTIZE} (faster than the kernels in this dtype)")
                    break
                continue
            if not kernel.available(device, dtype):
                problems.append(f"{kernel.name} " + (kernel.missing() if kernel.op is None else
                                                     f"does not serve {str(dtype).replace('torch.', '')}"))
                continue
            failure = _self_check(kernel, device, dtype)
            if failure is None:
                skipped = "".join(f"; {problem}" for problem in problems)
                rows = "any number of" if kernel.max_rows == ALL_ROWS else f"up to {kernel.max_rows}"
                choice = Choice(kernel, f"{kernel.name} (self-check passed; {rows} rows{skipped})")
                break
            problems.append(f"{kernel.name} failed its self-check ({failure})")
            self_check_failed = True
            # expected where a kernel needs an instruction the CPU lacks (oneDNN int8 without VNNI)
            logger.info("%s on %s: %s failed its self-check (%s); not using it", mode, device, kernel.name, failure)
        if choice is None:
            why = "; ".join(problems) or f"torch has no {mode} kernel for {device.type}"
            choice = Choice(None, f"{DEQUANTIZE} ({why})", fallback=True)
        _CHOICES[key] = choice
        level = logging.WARNING if choice.fallback and self_check_failed else logging.INFO
        logger.log(level, "%s weights on %s in %s: %s", mode, device, str(dtype).replace("torch.", ""), choice.reason)
    if choice.fallback and not fallback:
        raise JanusError(
            f"No working {mode} kernel on {device} for {str(dtype).replace('torch.', '')} weights: "
            f"{choice.reason.removeprefix(DEQUANTIZE + ' ')}. Allow the dequantize-then-matmul fallback "
            "(slower, same memory), pick another precision (int8, bf16), or run on a device with a kernel."
        )
    return choice
