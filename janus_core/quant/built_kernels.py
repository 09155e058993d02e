"""Weight-only int4 / int8 matmuls in small C kernels built on this machine at first use, in variants per CPU class.

torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) converts the weights to float32 and multiplies in
float32, so on CPUs with bf16 dot products it runs at half their rate or less (~2x slower than a bf16 matmul at 32
rows, an AR decode step at batch 16), and on AVX2 CPUs it reads about a third of the bytes per second that memory
gives (int4 at batch 1 ~1.5x bf16 there, not 2x); oneDNN's int8 GEMM (:mod:`.onednn_int8`) needs two split terms
per row. The kernels keep the weights as 4- or 8-bit integers, widen them as they are used and multiply them with
the CPU's integer-exact dot products; scales (and int4 zeros) are applied once per group in float32 (the C files'
headers state the arithmetic and the layout). Variants, best first (per mode, the first this CPU runs that has the
mode is used):

* ``amx`` on ``amx-bf16`` CPUs (Intel Sapphire Rapids and later; ``int_bf16_matmul.c``): int4 and int8 in AMX
  tiles (``tdpbf16ps``), after Linux grants the process AMX state (the first call asks, as oneDNN does).
* ``avx512bf16`` on ``native-bf16`` CPUs (AVX512-BF16: AMD Zen 4 / Zen 5, Intel Cooper Lake; the same file): int4
  in ``vdpbf16ps`` register tiles.
* ``avx512vnni``, ``avxvnni``, ``avx2`` (``int16_dot_matmul.c`` built three ways): int4 and int8 with 16-bit
  integer dot products (``vpdpwssd`` on 512-bit vectors with AVX512-VNNI: int8 on Zen 4 / 5, both modes on Intel
  Cascade Lake / Ice Lake; ``vpdpwssd`` on 256-bit vectors with AVX-VNNI: Alder Lake and later clients; else
  ``vpmaddwd``: Haswell to Comet Lake, AMD Zen 1-3), the activations written per group as 16-bit integers times a
  power of two (exact for values within 2^8 of the group's largest, the others within 2^-16 of it). AVX-VNNI CPUs
  leave int8 to oneDNN's GEMM (its byte dot products measured faster there at batch 16).

All read the same layouts (:func:`pack`). They are built with the machine's C compiler (``$CC``, else ``cc`` /
``gcc`` / ``clang``) into a cache folder (``$JANUS_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/comfyui-janus/kernels``,
else ``~/.cache/...``) on first use, about a second per file, and loaded with ctypes; they run on the OpenMP runtime
torch already loaded, so ``torch.set_num_threads`` applies to them. Offered only on Linux x86-64, with a torch built
with OpenMP, for the instructions torch's own CPU kernels may use (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``
limit the variants too); ``JANUS_NATIVE_KERNELS=0`` turns them off. Where the best variant cannot be built or run,
a warning names the reason and the next variant, or the stock kernels (:mod:`janus_core.quant.kernels`), serve.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import precision
from ..errors import JanusError
from .formats import check_mode, int4_group_size, int4_values

logger = logging.getLogger(__name__)

AMX = "amx"
AVX512 = "avx512bf16"
AVX512_VNNI = "avx512vnni"
AVX_VNNI = "avxvnni"
AVX2 = "avx2"
PREFERENCE = (AMX, AVX512, AVX512_VNNI, AVX_VNNI, AVX2)  # best first, per mode
AMX_REQUEST = "janus_amx_request"
BUILD_TIMEOUT = 300  # seconds
BLOCK = 32  # outputs per block of the layouts
MAX_GROUP = 256  # the C files' 2 * MAX_PAIRS
SWITCH = "JANUS_NATIVE_KERNELS"
# Rows packed per step (whole blocks): the unpacked 0..15 values of a 102400-row lm_head would take 420 MB.
PACK_ROWS = 4096


INT16_SOURCE = "int16_dot_matmul.c"


@dataclass(frozen=True)
class Build:
    """One compiled file: its C source (next to this module), compiler flags and the C function per mode (None: on
    CPUs that run this variant the stock kernel serves the mode, measured faster there)."""

    source: str
    flags: tuple[str, ...]
    symbols: dict[str, str | None]

    def scratch_bytes(self, mode: str, rows: int, k: int, group: int) -> int:
        """Bytes of work memory the function needs for ``rows x k`` activations (int4: ``group`` inputs per scale)."""
        runs = rows * (k // group)
        if self.source == INT16_SOURCE:  # the activations as int16, and per run d, c d (float32), 8 c (int32)
            return rows * k * 2 + runs * 12
        return 0 if mode == "int8" else runs * 4  # int4: the runs' sums (float32)


_COMMON = ("-O3", "-fPIC", "-shared", "-fopenmp")
_BF16 = (*_COMMON, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
_AVX2 = (*_COMMON, "-mavx2", "-mfma")
_INT16 = {"int4": "janus_int4_int16_matmul", "int8": "janus_int8_int16_matmul"}
BUILDS = {
    AMX: Build("int_bf16_matmul.c", _BF16, {"int4": "janus_int4_amx_matmul", "int8": "janus_int8_amx_matmul"}),
    AVX512: Build("int_bf16_matmul.c", _BF16, {"int4": "janus_int4_bf16_matmul"}),
    AVX512_VNNI: Build(INT16_SOURCE, (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vnni", "-DJANUS_AVX512_VNNI"),
                       _INT16),
    # AVX-VNNI CPUs: oneDNN's int8 GEMM (vpdpbusd) measured 1.25x faster at batch 16, level at batch 1
    AVX_VNNI: Build(INT16_SOURCE, (*_AVX2, "-mavxvnni", "-DJANUS_AVX_VNNI"), {**_INT16, "int8": None}),
    AVX2: Build(INT16_SOURCE, _AVX2, _INT16),
}


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split like a shell would), else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = next((shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
    return [found] if found else None


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("JANUS_KERNEL_CACHE"):
        return Path(os.environ["JANUS_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "comfyui-janus" / "kernels"


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux)."""
    names = ("libgomp", "libomp", "libiomp")
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        return {line.split()[-1] for line in maps if any(n in line.rsplit("/", 1)[-1] for n in names)}


def cpu_problem(variant: str, caps: precision.CpuCaps) -> str | None:
    """Why ``variant``'s instructions are not for this CPU (or not within torch's limits: ``ATEN_CPU_CAPABILITY``,
    ``ONEDNN_MAX_CPU_ISA``), or None."""
    limit = caps.onednn_isa_limit
    if variant == AMX and precision.bf16_class(caps) != precision.AMX:
        return "needs a CPU with AMX"
    if variant == AVX512 and precision.bf16_class(caps) not in (precision.NATIVE, precision.AMX):
        return "needs a CPU with AVX512-BF16"
    if variant not in (AMX, AVX512) and not {"avx2", "fma"} <= set(caps.flags):
        return "needs a CPU with AVX2 and FMA"
    capabilities = ("AVX2", "AVX512") if variant in (AVX_VNNI, AVX2) else ("AVX512",)
    if caps.capability not in capabilities:
        return (f"needs torch's {'AVX2' if variant in (AVX_VNNI, AVX2) else 'AVX-512'} kernels (torch runs at "
                f"{caps.capability}, see ATEN_CPU_CAPABILITY)")
    if variant == AVX_VNNI and not (caps.avx_vnni and precision.onednn_allows(limit, "AVX2_VNNI")):
        return "needs a CPU with AVX-VNNI (within ONEDNN_MAX_CPU_ISA)"
    if variant == AVX512_VNNI and not (caps.avx512_vnni and precision.onednn_allows(limit, "AVX512_CORE_VNNI")):
        return "needs a CPU with AVX512-VNNI (within ONEDNN_MAX_CPU_ISA)"
    return None


def platform_problem(caps: precision.CpuCaps) -> str | None:
    """Why this machine can take none of the kernels (OS, CPU, torch build, the switch), or None."""
    if os.environ.get(SWITCH, "1").strip() in ("0", "false", "no", "off"):
        return f"is turned off ({SWITCH}={os.environ[SWITCH]})"
    if not sys.platform.startswith("linux") or caps.arch.lower() not in ("x86_64", "amd64"):
        return "is built for Linux on x86-64 only"
    if all(cpu_problem(variant, caps) for variant in PREFERENCE):
        return cpu_problem(AVX2, caps)
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return "needs a torch built with OpenMP (this one would run two thread pools)"
    return None


def _build(source: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile ``source`` with ``flags`` into ``target`` (atomically: concurrent builds leave no half-written file)."""
    compiler = _compiler()
    if compiler is None:
        raise JanusError("no C compiler found (set CC, or install gcc / clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=target.parent)
    os.close(fd)
    try:
        command = [*compiler, *flags, str(Path(__file__).with_name(source)), "-o", partial]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise JanusError(f"{shlex.join(compiler)} could not run ({exc})") from exc
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
            raise JanusError(f"{shlex.join(compiler)} failed: {last}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _library_path(source: str, flags: tuple[str, ...]) -> Path:
    """The library built from ``source`` with ``flags`` by this compiler (built now if the cache lacks it)."""
    compiler = _compiler() or ["?"]
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60,
                                 check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    path = Path(__file__).with_name(source)
    key = hashlib.sha256(path.read_bytes() + repr((compiler, flags, version)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{path.stem}-{key}.so"
    if not target.exists():
        start = time.perf_counter()
        _build(source, flags, target)
        logger.info("built the int4 / int8 kernels of %s in %.1f s: %s", source, time.perf_counter() - start, target)
    return target


def _amx_problem(library: ctypes.CDLL) -> str | None:
    """Why the AMX variant cannot run in this process (asking Linux for AMX state first), or None."""
    if not hasattr(library, AMX_REQUEST):
        return "the C compiler does not know AMX (gcc 11 / clang 12 or newer does)"
    if library[AMX_REQUEST]() != 0:
        return "Linux did not grant this process AMX state (arch_prctl ARCH_REQ_XCOMP_PERM; kernel 5.16 or newer)"
    return None


@functools.cache
def _library(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """``source`` built with ``flags`` (or taken from the cache) and loaded, once per process; raises
    :class:`JanusError`."""
    runtimes = _openmp_runtimes()
    try:
        library = ctypes.CDLL(str(_library_path(source, flags)))
    except OSError as exc:
        raise JanusError(f"could not be loaded: {exc}") from exc
    if len(_openmp_runtimes() | runtimes) > max(1, len(runtimes)):
        raise JanusError("loaded a second OpenMP runtime next to torch's (the compiler's); not using it")
    return library


@functools.cache
def _variant(variant: str) -> tuple[dict[str, Callable[..., None]] | None, str | None]:
    """(``variant``'s functions per mode, None) or (None, why it cannot run here); once per process."""
    caps = precision.local_cpu_caps()
    problem = platform_problem(caps) or cpu_problem(variant, caps)
    if problem:
        return None, problem
    build = BUILDS[variant]
    try:
        library = _library(build.source, build.flags)
    except JanusError as exc:
        return None, f"could not be built or loaded: {exc}"
    if variant == AMX:
        problem = _amx_problem(library)
        if problem:
            return None, f"cannot use AMX: {problem}"
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    functions = {}
    for mode, symbol in build.symbols.items():
        if symbol is None:
            continue
        function = getattr(library, symbol)
        function.argtypes = [pointer, size, size, pointer, pointer, size, size, pointer, pointer]
        function.restype = None
        functions[mode] = function
    return functions, None


@functools.cache
def _chosen(mode: str) -> tuple[str | None, str | None]:
    """(the best variant this machine runs for ``mode``, None) or (None, why none); once per process and mode. A
    better variant the CPU has but that cannot be built or run is named in a warning, with what serves instead."""
    caps = precision.local_cpu_caps()
    problem = platform_problem(caps)
    if problem:
        return None, problem
    failed = []
    for variant in (v for v in PREFERENCE if mode in BUILDS[v].symbols):
        if BUILDS[variant].symbols[mode] is None:
            if cpu_problem(variant, caps) is None:
                return None, f"leaves {mode} to the stock kernels on {variant} CPUs (measured faster there)"
            continue
        functions, problem = _variant(variant)
        if functions is None:
            if not problem.startswith("needs "):  # the CPU has the instructions, but the variant cannot be used
                failed.append(f"the {variant} variant {problem}")
            continue
        if failed:
            logger.warning("%s on this CPU: %s; the %s variant serves instead (slower). Install a C compiler (gcc) "
                           "or set CC; %s=0 silences this.", mode, "; ".join(failed), variant, SWITCH)
        logger.info("%s weights: the %s variant of the built kernels", mode, variant)
        return variant, None
    if not failed:
        return None, f"has no {mode} kernel for this CPU"
    logger.warning("%s on this CPU: %s; the stock kernels serve instead (about 2x slower at batch 16). Install a C "
                   "compiler (gcc) or set CC; %s=0 silences this.", mode, "; ".join(failed), SWITCH)
    return None, "; ".join(failed)


def forget() -> None:
    """Decide again at the next call what loads (after changing ``JANUS_NATIVE_KERNELS``, ``CC``, the cache)."""
    for cached in (_chosen, _variant, _library):
        cached.cache_clear()


def runnable_variants() -> tuple[str, ...]:
    """Every variant this machine can build and run (builds them all: for tests and benchmarks)."""
    return tuple(variant for variant in PREFERENCE if _variant(variant)[0] is not None)


def chosen_variant(mode: str) -> str | None:
    """The variant that serves ``mode`` here (builds it on the first call where one can be), or None."""
    return _chosen(mode)[0]


def unavailable_reason(mode: str) -> str | None:
    """Why no built kernel serves ``mode`` here, or None."""
    return _chosen(mode)[1]


def available(mode: str) -> bool:
    """Whether a built kernel serves ``mode`` (``"int4"`` / ``"int8"``) on this machine."""
    return unavailable_reason(mode) is None


def fits(mode: str, out_features: int, in_features: int) -> bool:
    """Whether the ``mode`` layout takes an ``[out_features, in_features]`` weight."""
    if out_features % BLOCK or in_features % 32:
        return False
    return check_mode(mode) == "int8" or int4_group_size(in_features) <= MAX_GROUP


def pack(qweight: torch.Tensor, qscale: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``qweight`` / ``qscale`` -> the kernels' layout (the C file's; same sizes as the canonical tensors):
    int4 ``[N, K / 2]`` / ``[N, K / g, 2]`` -> ``[N / 32, K / 2, 32]`` bytes and ``[N / 32, K / g, 2, 32]`` scales;
    int8 ``[N, K]`` / ``[N]`` -> ``[N / 32, K / 2, 64]`` int8 and the scales as they are."""
    if check_mode(mode) == "int8":
        n, k = qweight.shape
        # [blocks, 2 halves, 16 outputs, pairs, 2 inputs] -> [blocks, pairs, (half, output, input)]
        packed = qweight.view(n // BLOCK, 2, BLOCK // 2, k // 2, 2).permute(0, 3, 1, 2, 4)
        return packed.reshape(n // BLOCK, k // 2, 2 * BLOCK), qscale.contiguous()
    n, half = qweight.shape
    blocks, groups = n // BLOCK, qscale.shape[1]
    packed = torch.empty(blocks, half, BLOCK, dtype=torch.uint8, device=qweight.device)
    step = PACK_ROWS // BLOCK
    for first in range(0, blocks, step):
        last = min(first + step, blocks)
        # [blocks, 2 halves, 16 outputs, pairs, 2 inputs] -> per half [blocks, pairs, (output, input)]
        q = int4_values(qweight[first * BLOCK:last * BLOCK]).view(last - first, 2, BLOCK // 2, half, 2)
        low, high = (q[:, i].permute(0, 2, 1, 3).reshape(last - first, half, BLOCK) for i in (0, 1))
        packed[first:last] = low | (high << 4)
    scales = qscale.view(blocks, BLOCK, groups, 2).permute(0, 2, 3, 1).contiguous()
    return packed, scales


def unpack(packed: torch.Tensor, scales: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical ``(qweight, qscale)`` of :func:`pack` ed tensors (new tensors, on their device)."""
    blocks, half, _ = packed.shape
    if check_mode(mode) == "int8":
        qweight = packed.view(blocks, half, 2, BLOCK // 2, 2).permute(0, 2, 3, 1, 4)
        return qweight.reshape(blocks * BLOCK, half * 2).contiguous(), scales.clone()
    groups = scales.shape[1]
    halves = [(packed & 0xF), (packed >> 4)]  # [blocks, pairs, (output, input)]
    q = torch.stack([h.view(blocks, half, BLOCK // 2, 2).permute(0, 2, 1, 3) for h in halves], dim=1)
    q = q.reshape(blocks * BLOCK, half * 2)
    qweight = (q[:, 0::2] << 4) | q[:, 1::2]
    qscale = scales.permute(0, 3, 1, 2).reshape(blocks * BLOCK, groups, 2)
    return qweight.contiguous(), qscale.contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mode: str, variant: str | None = None
           ) -> torch.Tensor:
    """``x [M, K]`` bf16 (CPU) times the :func:`pack` ed ``mode`` weight ``[N, K]`` transposed -> ``[M, N]`` bf16, by
    the ``variant`` (one of :func:`runnable_variants`; default: :func:`chosen_variant`)."""
    if variant is not None and variant not in BUILDS:
        raise JanusError(f"internal: no kernel variant {variant!r} (there are {', '.join(PREFERENCE)})")
    chosen, problem = _chosen(mode)
    if chosen is None and variant is None:
        raise JanusError(f"internal: the {mode} kernels {problem}")
    if x.dim() != 2 or packed.dim() != 3:
        raise JanusError(f"internal: {mode} kernel given x {list(x.shape)} and weight {list(packed.shape)} (needs "
                         "[M, K] and [N / 32, K / 2, width])")
    blocks, half, width = packed.shape
    rows, k = x.shape
    n = blocks * BLOCK
    int8 = check_mode(mode) == "int8"
    # int4: the scale groups; int8: inputs summed before the scale is applied (keeps float32 sums short)
    group = int4_group_size(k) if k % 32 == 0 else 0
    scale_shape = (n,) if int8 else (blocks, k // max(group, 1), 2, BLOCK)
    if (x.dtype != torch.bfloat16 or k != 2 * half or width != (2 if int8 else 1) * BLOCK
            or packed.dtype != (torch.int8 if int8 else torch.uint8) or scales.shape != scale_shape
            or scales.dtype != torch.bfloat16 or not fits(mode, n, k) or x.device.type != "cpu"):
        raise JanusError(f"internal: {mode} kernel given x {list(x.shape)} {x.dtype} on {x.device}, weight "
                         f"{list(packed.shape)} {packed.dtype}, scales {list(scales.shape)} {scales.dtype}")
    variant = variant or chosen
    function = (_variant(variant)[0] or {}).get(mode)
    if function is None:
        raise JanusError(f"internal: no {variant} {mode} kernel on this machine (it runs {runnable_variants()})")
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.contiguous()
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    if rows:
        scratch = torch.empty(BUILDS[variant].scratch_bytes(mode, rows, k, group), dtype=torch.uint8)
        function(x.data_ptr(), rows, k, packed.data_ptr(), scales.data_ptr(), n, group, scratch.data_ptr(),
                 y.data_ptr())
    return y
