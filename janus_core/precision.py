"""Which dtype each part of a Janus model runs in, and which kernel form the device runs fastest.

Every speed decision that depends on the machine is made here: :func:`probe_cpu` reads what the CPU and
this torch build can do, and pure functions (:func:`bf16_class`, :func:`choose_precision`,
:func:`matmul_form`, :func:`attention_form`, :func:`conv_form`) turn that into choices, so tests can call
them with any capability faked. The CPU is probed once per process and logged (:func:`local_cpu_caps`).

CPU classes, by how they run bfloat16 (measurements: docs/PERFORMANCE.md):

* ``amx-bf16``: AMX tiles (Intel Sapphire Rapids and later). bf16 everywhere; few-row matmuls as
  ``weight @ x.T`` (oneDNN's AMX kernel streams the weight fastest in that operand order).
* ``native-bf16``: bf16 dot-product instructions without AMX (AVX512-BF16 on AMD Zen 4 / Intel Cooper Lake,
  the ARM BF16 extension). bf16 everywhere; up to :data:`NATIVE_X_WT_ROWS` rows ``x @ weight.T`` (there
  ``weight @ x.T`` streams at half the speed), more rows ``weight @ x.T``.
* ``emulated-bf16``: no bf16 instructions (AVX2-only x86, AVX-512 without BF16, ARM without BF16): bf16
  convolutions are 2-200x slower than float32 and bf16 matmuls over more than a few rows 3-5x slower. The
  convolution stacks and SigLIP run in float32; the LLM and the image-token head keep bf16 weights (half the
  bytes to stream per decode step) and compute matmuls over more than :data:`EMULATED_BF16_ROWS` rows in
  float32, converting the weight in cache-sized chunks.

float32 weights on the CPU use ``weight @ x.T`` up to :data:`FP32_W_XT_ROWS` rows (MKL's SGEMM streams ~2x
faster that way than with ``x @ weight.T`` on the machines measured). On CPUs without AMX, one-query decode
steps attend row by row in float32 (:func:`attention_form`); float32 3x3 convolutions use NNPACK's Winograd
transform where torch has it (:func:`conv_form`). GPUs use torch's defaults throughout.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

AMX = "amx-bf16"
NATIVE = "native-bf16"
EMULATED = "emulated-bf16"

# Matmul forms (see matmul_form).
X_WT = "x@w.T"
W_XT = "w@x.T"
FP32_CHUNKS = "fp32-chunks"
# Attention forms (see attention_form).
SDPA = "sdpa"
FP32_ROWS = "fp32-rows"
# Convolution forms (see conv_form).
DIRECT = "direct"
WINOGRAD = "winograd"

AMX_W_XT_ROWS = 256  # amx-bf16: weight @ x.T up to this many rows
NATIVE_X_WT_ROWS = 16  # native-bf16: x @ weight.T up to this many rows, then weight @ x.T ...
NATIVE_W_XT_ROWS = 256  # ... up to this many
EMULATED_BF16_ROWS = 4  # emulated-bf16: bf16 kernels up to this many rows, float32 chunks above
FP32_W_XT_ROWS = 1024  # float32: weight @ x.T up to this many rows
# Elements of weight converted to float32 per matmul in the float32-chunks form, and per chunk when quantized
# weights are dequantized to float32 (4 MiB: stays in the L2 / L3 cache).
FP32_CHUNK_ELEMENTS = 1 << 20

# oneDNN's ISA levels in increasing order (values of ONEDNN_MAX_CPU_ISA, which caps what oneDNN dispatches).
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16")
# /proc/cpuinfo flags worth reporting with a benchmark table.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_int8", "asimd", "bf16", "sve", "sve2", "svebf16")

COMPONENTS = ("llm", "gen_head", "vq", "vision", "flow", "vae")
_LABELS = {"llm": "the language model", "gen_head": "the image-token head", "vq": "the VQ image decoder",
           "vision": "SigLIP", "flow": "JanusFlow's U-ViT", "vae": "the SDXL VAE"}


@dataclass(frozen=True)
class CpuCaps:
    """What the CPU and this torch build can do for bf16 (fields are plain values: fake them in tests).

    ``capability``: torch's kernel level (``torch.backends.cpu.get_cpu_capability()``; honours
    ``ATEN_CPU_CAPABILITY``). ``avx512_bf16`` / ``amx_bf16``: the instructions exist (x86).
    ``arm_bf16``: the ARM BF16 extension exists. ``onednn_bf16``: oneDNN runs bf16 kernels (natively or
    converting). ``onednn_isa_limit``: ``ONEDNN_MAX_CPU_ISA`` ("" when unset). ``avx512_vnni`` / ``avx_vnni`` /
    ``amx_int8``: x86 byte dot-product instructions exist (see :func:`int8_dot_product`).
    """

    model: str = "?"
    arch: str = "x86_64"
    capability: str = "AVX2"
    avx512_bf16: bool = False
    amx_bf16: bool = False
    arm_bf16: bool = False
    onednn_bf16: bool = False
    onednn_isa_limit: str = ""
    flags: tuple[str, ...] = ()
    avx512_vnni: bool = False
    avx_vnni: bool = False
    amx_int8: bool = False

    def describe(self) -> str:
        """One line for logs and benchmark tables: model, class, torch capability, relevant flags."""
        limit = f", ONEDNN_MAX_CPU_ISA={self.onednn_isa_limit}" if self.onednn_isa_limit else ""
        flags = " ".join(self.flags) or "none reported"
        return (f"{self.model} ({self.arch}): {bf16_class(self)}; torch CPU capability {self.capability}, "
                f"oneDNN bf16 {'yes' if self.onednn_bf16 else 'no'}{limit}; flags: {flags}")


def onednn_allows(limit: str, isa: str) -> bool:
    """Whether an ``ONEDNN_MAX_CPU_ISA`` value ``limit`` lets oneDNN use ``isa`` (unknown values: yes)."""
    limit = limit.strip().upper()
    if not limit or limit in ("ALL", "DEFAULT") or limit not in _ONEDNN_ISAS:
        return True
    return _ONEDNN_ISAS.index(limit) >= _ONEDNN_ISAS.index(isa)


def bf16_class(caps: CpuCaps) -> str:
    """The CPU's bf16 class: :data:`AMX`, :data:`NATIVE` or :data:`EMULATED` (see the module docstring)."""
    if caps.arch.lower() in ("aarch64", "arm64"):
        return NATIVE if caps.arm_bf16 and caps.onednn_bf16 else EMULATED
    native = (caps.onednn_bf16 and (caps.avx512_bf16 or caps.amx_bf16)
              and onednn_allows(caps.onednn_isa_limit, "AVX512_CORE_BF16"))
    if not native:
        return EMULATED
    if caps.amx_bf16 and onednn_allows(caps.onednn_isa_limit, "AVX512_CORE_AMX"):
        return AMX
    return NATIVE


def onednn_ops(namespace: str, *names: str) -> tuple[Callable[..., torch.Tensor], ...] | None:
    """``torch.ops.<namespace>.<name>`` for each of ``names``, or None when this torch lacks one of them or was
    built without oneDNN (the optional CPU kernels of :mod:`janus_core.cpu_packed` and
    :mod:`janus_core.quant.onednn_int8`)."""
    space = getattr(torch.ops, namespace, None)
    ops = tuple(getattr(space, name, None) for name in names)
    if any(op is None for op in ops) or not torch.backends.mkldnn.is_available():
        return None
    return ops


def int8_dot_product(caps: CpuCaps) -> bool:
    """Whether oneDNN multiplies bytes with VNNI or AMX here (x86; within ``ONEDNN_MAX_CPU_ISA``). Without them
    its int8 GEMM adds byte products in saturating 16-bit sums (wrong results); on other architectures it may
    run a slow reference path. Decides :mod:`janus_core.quant.onednn_int8`."""
    if caps.arch.lower() not in ("x86_64", "amd64"):
        return False
    limit = caps.onednn_isa_limit
    return ((caps.avx512_vnni and onednn_allows(limit, "AVX512_CORE_VNNI"))
            or (caps.avx_vnni and onednn_allows(limit, "AVX2_VNNI"))
            or (caps.amx_int8 and onednn_allows(limit, "AVX512_CORE_AMX")))


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("?", empty) where there is none (macOS, Windows)."""
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and model in ("?", "", platform.processor()):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def probe_cpu() -> CpuCaps:
    """Read the CPU's bf16 capabilities (a few microseconds; cached by :func:`local_cpu_caps`)."""
    model, flags = _cpuinfo()
    arch = platform.machine() or "?"
    cpu = getattr(torch, "cpu", None)

    def torch_probe(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except RuntimeError:
            return False

    try:
        onednn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    return CpuCaps(
        model=model, arch=arch, capability=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16=torch_probe("_is_avx512_bf16_supported") or "avx512_bf16" in flags,
        amx_bf16=torch_probe("_is_amx_tile_supported") and ("amx_bf16" in flags or not flags),
        arm_bf16="bf16" in flags, onednn_bf16=onednn_bf16,
        onednn_isa_limit=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        flags=tuple(f for f in REPORTED_FLAGS if f in flags),
        avx512_vnni="avx512_vnni" in flags or (not flags and torch_probe("_is_vnni_supported")),
        avx_vnni="avx_vnni" in flags,
        amx_int8="amx_int8" in flags or (not flags and torch_probe("_is_amx_tile_supported")),
    )


@functools.cache
def local_cpu_caps() -> CpuCaps:
    """:func:`probe_cpu`, once per process (logged at the first call)."""
    caps = probe_cpu()
    logger.info("CPU: %s", caps.describe())
    return caps


@functools.cache
def local_cpu_class() -> str:
    """This machine's :func:`bf16_class`, once per process."""
    return bf16_class(local_cpu_caps())


def cpu_class_for(device_type: str, cpu_class: str | None = None) -> str | None:
    """``cpu_class`` if given, else this machine's :func:`local_cpu_class` for a CPU device (None for others):
    what the pure ``*_form`` functions below need for ``device_type``."""
    if device_type == "cpu" and cpu_class is None:
        return local_cpu_class()
    return cpu_class


@dataclass(frozen=True)
class Precision:
    """The dtype of each component of a Janus model (see :data:`COMPONENTS`).

    ``llm``: the language model with the image-token embedding and its aligner (also the KV cache);
    ``gen_head``: the image-token head; ``vq``: the VQ image tokenizer; ``vision``: SigLIP and its aligner
    (understanding); ``flow``: JanusFlow's U-ViT encoder / decoder and their aligners; ``vae``: the SDXL VAE
    that decodes JanusFlow latents outside ComfyUI. ``reason`` says why, for the log.
    """

    llm: torch.dtype
    gen_head: torch.dtype
    vq: torch.dtype
    vision: torch.dtype
    flow: torch.dtype
    vae: torch.dtype
    reason: str = field(default="", compare=False)

    @classmethod
    def uniform(cls, dtype: torch.dtype, reason: str = "") -> Precision:
        """Every component in ``dtype``."""
        return cls(dtype, dtype, dtype, dtype, dtype, dtype, reason)

    def of(self, component: str) -> torch.dtype:
        """The dtype of ``component`` (one of :data:`COMPONENTS`)."""
        if component not in COMPONENTS:
            raise KeyError(f"unknown model component {component!r}; one of {COMPONENTS}")
        return getattr(self, component)

    def summary(self) -> str:
        """``bf16`` when every component shares one dtype, else ``llm bf16, gen_head bf16, vq fp32, ...``."""
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        dtypes = {c: names.get(getattr(self, c), str(getattr(self, c))) for c in COMPONENTS}
        if len(set(dtypes.values())) == 1:
            return dtypes["llm"]
        return ", ".join(f"{c} {d}" for c, d in dtypes.items())

    def describe(self) -> str:
        """Every component's dtype (``llm bf16, gen_head bf16, vq fp32, ...``) and the reason."""
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        parts = ", ".join(f"{c} {names.get(getattr(self, c), getattr(self, c))}" for c in COMPONENTS)
        return f"{parts} ({self.reason})" if self.reason else parts


def _half(reason: str) -> Precision:
    """float16 with the VQ decoder, the image-token head and the SDXL VAE in float32 (float16 overflows there;
    the head's logits decide every token)."""
    f16, f32 = torch.float16, torch.float32
    return Precision(llm=f16, gen_head=f32, vq=f32, vision=f16, flow=f16, vae=f32, reason=reason)


def choose_precision(device_type: str, requested: torch.dtype | None = None, cpu_class: str | None = None,
                     cuda_bf16: bool = False) -> Precision:
    """The :class:`Precision` for a model running on ``device_type`` (``"cpu"``, ``"cuda"``, ``"mps"``, ...).

    ``requested``: the user's dtype (None = automatic). An explicit dtype is used for every component, except
    that float16 keeps the components that overflow in it in float32. Automatic: bf16 on GPUs that support
    it, else float16; float16 on MPS; on the CPU bf16 when it has bf16 instructions (``cpu_class`` :data:`AMX`
    or :data:`NATIVE`), else bf16 weights for the LLM and the image-token head (halving the bytes a decode
    step streams) and float32 for the convolution stacks and SigLIP. ``cpu_class`` is needed for the CPU
    (see :func:`bf16_class`); ``cuda_bf16`` tells whether the CUDA device supports bf16.
    """
    if requested is not None:
        if not requested.is_floating_point:
            raise ValueError(f"dtype must be a floating point torch dtype, got {requested}")
        if requested == torch.float16:
            return _half("float16 requested")
        return Precision.uniform(requested, f"{requested} requested")
    if device_type == "cuda":
        return Precision.uniform(torch.bfloat16, "GPU supports bf16") if cuda_bf16 else _half("GPU without bf16")
    if device_type == "mps":
        return _half("Apple GPU")
    if device_type == "cpu":
        if cpu_class is None:
            raise ValueError("choose_precision needs the CPU's bf16 class for the CPU (see bf16_class)")
        if cpu_class in (AMX, NATIVE):
            return Precision.uniform(torch.bfloat16, f"CPU with bf16 instructions ({cpu_class})")
        bf16, f32 = torch.bfloat16, torch.float32
        return Precision(llm=bf16, gen_head=bf16, vq=f32, vision=f32, flow=f32, vae=f32,
                         reason="CPU without bf16 instructions: convolutions and SigLIP in fp32, "
                                "bf16 weights for the LLM")
    return Precision.uniform(torch.float32, f"{device_type} device")


def precision_for(device: torch.device | str, requested: torch.dtype | None = None) -> Precision:
    """:func:`choose_precision` for ``device`` as probed on this machine; warns when a requested dtype is the
    slow choice for part of the model."""
    device = torch.device(device)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu_class = local_cpu_class() if device.type == "cpu" else None
    chosen = choose_precision(device.type, requested, cpu_class, cuda_bf16)
    slow = slow_choices(chosen, cpu_class) if cpu_class is not None else []
    if slow:
        logger.warning("%s run 2-200x slower in bf16 than in fp32 on this CPU (it has no bf16 instructions); "
                       "dtype auto keeps them in fp32.", ", ".join(_LABELS[c] for c in slow))
    return chosen


def slow_choices(precision: Precision, cpu_class: str) -> list[str]:
    """Components ``precision`` puts in bf16 that run much slower in bf16 than in fp32 on a ``cpu_class`` CPU."""
    if cpu_class != EMULATED:
        return []
    return [c for c in ("vq", "vision", "flow", "vae") if precision.of(c) == torch.bfloat16]


def attention_form(dtype: torch.dtype, queries: int, device_type: str = "cpu", cpu_class: str | None = None
                   ) -> str:
    """How to attend ``queries`` new positions per row over a KV cache in ``dtype``: :data:`SDPA` (torch's
    kernel) or :data:`FP32_ROWS` (one-query decode steps on CPUs without AMX: row by row, each row's keys and
    values converted to float32 in a cache-resident buffer; the bf16 kernel streams the cache at ~4 GB/s there,
    this at ~12 GB/s). Pure, like :func:`matmul_form`."""
    if device_type != "cpu" or dtype == torch.float32 or queries != 1 or cpu_class not in (NATIVE, EMULATED):
        return SDPA
    return FP32_ROWS


def conv_form(dtype: torch.dtype, device_type: str, kernel_size: tuple[int, ...], stride: tuple[int, ...],
              dilation: tuple[int, ...], groups: int, nnpack: bool) -> str:
    """:data:`WINOGRAD` (NNPACK's Winograd transform, 2-3x faster than oneDNN's direct float32 convolution on
    the CPUs measured, relative error ~1e-5) for float32 3x3 stride-1 convolutions on a CPU whose torch has
    NNPACK (``nnpack``), else :data:`DIRECT` (torch's choice). Pure, like :func:`matmul_form`."""
    plain = tuple(kernel_size) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1
    if device_type == "cpu" and dtype == torch.float32 and plain and nnpack:
        return WINOGRAD
    return DIRECT


@functools.cache
def nnpack_available() -> bool:
    """Whether this torch build can run NNPACK convolutions."""
    try:
        return bool(torch._nnpack_available()) and hasattr(torch, "_nnpack_spatial_convolution")
    except (AttributeError, RuntimeError):
        return False


def matmul_form(dtype: torch.dtype, rows: int, device_type: str = "cpu", cpu_class: str | None = None) -> str:
    """How to compute ``x [rows, K] @ weight[N, K].T`` fastest: :data:`X_WT`, :data:`W_XT` or :data:`FP32_CHUNKS`.

    Pure: ``cpu_class`` (for the CPU) is :func:`bf16_class`'s answer. See the module docstring for the table.
    """
    if device_type != "cpu":
        return X_WT
    if dtype == torch.float32:
        return W_XT if rows <= FP32_W_XT_ROWS else X_WT
    if dtype != torch.bfloat16:
        return X_WT
    if cpu_class == AMX:
        return W_XT if rows <= AMX_W_XT_ROWS else X_WT
    if cpu_class == NATIVE:
        if rows <= NATIVE_X_WT_ROWS:
            return X_WT
        return W_XT if rows <= NATIVE_W_XT_ROWS else X_WT
    return X_WT if rows <= EMULATED_BF16_ROWS else FP32_CHUNKS


__all__ = ["AMX", "COMPONENTS", "DIRECT", "EMULATED", "FP32_CHUNKS", "FP32_CHUNK_ELEMENTS", "FP32_ROWS", "NATIVE",
           "SDPA", "WINOGRAD", "W_XT", "X_WT", "CpuCaps", "Precision", "attention_form", "bf16_class",
           "choose_precision", "conv_form", "cpu_class_for", "int8_dot_product", "local_cpu_caps", "local_cpu_class",
           "matmul_form", "nnpack_available", "onednn_ops", "precision_for", "probe_cpu", "slow_choices"]
