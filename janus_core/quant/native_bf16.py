"""int4 / int8 weights multiplied with bf16 dot-product instructions: small C kernels built on this machine at
first use, in two variants of the same arithmetic.

torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) converts the weights to float32 and multiplies in
float32, so on CPUs with bf16 dot products it runs at half their rate or less (~2x slower than a bf16 matmul at 32
rows, an AR decode step at batch 16); oneDNN's int8 GEMM (:mod:`.onednn_int8`) needs two split terms per row. The
kernels in ``int_bf16_matmul.c`` keep the weights as 4- or 8-bit integers, turn them into bf16 integers as they
are used (int4: one table lookup per 32 weights; int8: through float32) and multiply them with bf16 dot products
(exact products, float32 sums); scales (and int4 zeros) are applied once per group in float32 (the file's header
states the arithmetic and the layouts). Variants, by CPU class (:func:`janus_core.precision.bf16_class`):

* ``avx512bf16`` on ``native-bf16`` CPUs (AVX512-BF16 without AMX: AMD Zen 4 / Zen 5, Intel Cooper Lake):
  int4 in ``vdpbf16ps`` register tiles (int8 stays on oneDNN's GEMM there, measured as fast as bf16 at batch 16).
* ``amx`` on ``amx-bf16`` CPUs (Intel Sapphire Rapids and later): int4 and int8 in AMX tiles (``tdpbf16ps``),
  after Linux grants the process AMX state (the first call asks, as oneDNN does).

Both read the same layouts, so a weight packed on one machine's class is read by the other's. They are built with
the machine's C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``) into a cache folder (``$JANUS_KERNEL_CACHE``,
else ``$XDG_CACHE_HOME/comfyui-janus/kernels``, else ``~/.cache/...``) on first use, about a second, and loaded
with ctypes; they run on the OpenMP runtime torch already loaded, so ``torch.set_num_threads`` applies to them.
Offered only on Linux x86-64 with a torch that runs its CPU kernels at the AVX-512 level, with OpenMP;
``JANUS_NATIVE_KERNELS=0`` turns them off. Where they are not offered or the build fails, the reason is logged and
the stock kernels serve (:mod:`janus_core.quant.kernels`).
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

SOURCE = Path(__file__).with_name("int_bf16_matmul.c")
AVX512 = "avx512bf16"
AMX = "amx"
# The C functions of each variant, per mode.
SYMBOLS = {AVX512: {"int4": "janus_int4_bf16_matmul"},
           AMX: {"int4": "janus_int4_amx_matmul", "int8": "janus_int8_amx_matmul"}}
AMX_REQUEST = "janus_amx_request"
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
BUILD_TIMEOUT = 300  # seconds
BLOCK = 32  # outputs per block of the layouts
MAX_GROUP = 256  # the C file's 2 * MAX_PAIRS
SWITCH = "JANUS_NATIVE_KERNELS"
# Rows packed per step (whole blocks): the unpacked 0..15 values of a 102400-row lm_head would take 420 MB.
PACK_ROWS = 4096


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


def platform_problem(caps: precision.CpuCaps) -> str | None:
    """Why this machine cannot take the kernel (OS, CPU, torch build, the switch), or None."""
    if os.environ.get(SWITCH, "1").strip() in ("0", "false", "no", "off"):
        return f"is turned off ({SWITCH}={os.environ[SWITCH]})"
    if not sys.platform.startswith("linux") or caps.arch.lower() not in ("x86_64", "amd64"):
        return "is built for Linux on x86-64 only"
    if precision.bf16_class(caps) not in (precision.NATIVE, precision.AMX):
        return "needs a CPU with AVX512-BF16 (or AMX) instructions"
    if caps.capability != "AVX512":
        return f"needs torch's AVX-512 kernels (torch runs at {caps.capability}, see ATEN_CPU_CAPABILITY)"
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return "needs a torch built with OpenMP (this one would run two thread pools)"
    return None


def _build(target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` (atomically: concurrent builds cannot leave a half-written file)."""
    compiler = _compiler()
    if compiler is None:
        raise JanusError("no C compiler found (set CC, or install gcc / clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=target.parent)
    os.close(fd)
    try:
        command = [*compiler, *FLAGS, str(SOURCE), "-o", partial]
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


def _library_path() -> Path:
    """The built library for this source, flags and compiler (built now if the cache lacks it)."""
    compiler = _compiler() or ["?"]
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60,
                                 check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    key = hashlib.sha256(SOURCE.read_bytes() + repr((compiler, FLAGS, version)).encode()).hexdigest()[:16]
    target = cache_dir() / f"int_bf16_matmul-{key}.so"
    if not target.exists():
        start = time.perf_counter()
        _build(target)
        logger.info("built the int4 / int8 bf16-dot-product kernels in %.1f s: %s", time.perf_counter() - start, target)
    return target


@dataclass(frozen=True)
class Library:
    """The loaded kernels: ``functions[variant][mode]`` for the variants this CPU can run, and the ``variant`` its
    class uses."""

    functions: dict[str, dict[str, Callable[..., None]]]
    variant: str


def _functions(library: ctypes.CDLL, variant: str) -> dict[str, Callable[..., None]]:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    functions = {}
    for mode, symbol in SYMBOLS[variant].items():
        function = getattr(library, symbol)
        function.argtypes = [pointer, size, size, pointer, pointer, size, size, pointer, pointer]
        function.restype = None
        functions[mode] = function
    return functions


def _amx_problem(library: ctypes.CDLL) -> str | None:
    """Why the AMX variant cannot run in this process (asking Linux for AMX state first), or None."""
    if not hasattr(library, AMX_REQUEST):
        return "the C compiler does not know AMX (gcc 11 / clang 12 or newer does)"
    if library[AMX_REQUEST]() != 0:
        return "Linux did not grant this process AMX state (arch_prctl ARCH_REQ_XCOMP_PERM; kernel 5.16 or newer)"
    return None


@functools.cache
def _load() -> tuple[Library | None, str | None]:
    """(the kernels, None) or (None, why not); once per process."""
    caps = precision.local_cpu_caps()
    problem = platform_problem(caps)
    if problem:
        return None, problem
    runtimes = _openmp_runtimes()
    try:
        library = ctypes.CDLL(str(_library_path()))
    except (JanusError, OSError) as exc:
        logger.warning("int4 / int8 on this CPU: the bf16-dot-product kernels could not be built or loaded (%s); the "
                       "stock kernels serve instead (about 2x slower at batch 16). Install a C compiler (gcc) or "
                       "set CC; %s=0 silences this.", exc, SWITCH)
        return None, f"could not be built or loaded: {exc}"
    if len(_openmp_runtimes() | runtimes) > max(1, len(runtimes)):
        return None, "loaded a second OpenMP runtime next to torch's (the compiler's); not using it"
    functions = {AVX512: _functions(library, AVX512)}
    if precision.bf16_class(caps) != precision.AMX:
        return Library(functions, AVX512), None
    problem = _amx_problem(library)
    if problem:
        logger.warning("int4 / int8 on this AMX CPU: %s; the stock kernels serve instead (about 2x slower at batch "
                       "16). %s=0 silences this.", problem, SWITCH)
        return None, f"cannot use AMX: {problem}"
    functions[AMX] = _functions(library, AMX)
    logger.info("int4 / int8 kernels: AMX variant")
    return Library(functions, AMX), None


def runnable_variants() -> tuple[str, ...]:
    """The variants this machine can run (the one its class uses, and on AMX CPUs also the AVX512-BF16 one)."""
    library = _load()[0]
    return tuple(library.functions) if library else ()


def unavailable_reason(mode: str) -> str | None:
    """Why no kernel serves ``mode`` here (builds them on the first call where they can), or None."""
    library, problem = _load()
    if library is not None and mode not in library.functions[library.variant]:
        return f"has no {mode} kernel for this CPU class ({library.variant} variant)"
    return problem


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
    the ``variant`` (one of :func:`runnable_variants`; default: the CPU class's)."""
    library, problem = _load()
    if library is None:
        raise JanusError(f"internal: the int4 / int8 kernels {problem}")
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
    variant = variant or library.variant
    if mode not in library.functions.get(variant, {}):
        raise JanusError(f"internal: no {variant} {mode} kernel on this machine (it runs {runnable_variants()})")
    function = library.functions[variant][mode]
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.contiguous()
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    if rows:
        x_sums = torch.empty(0 if int8 else rows * (k // group), dtype=torch.float32)  # int4's per-group x sums
        function(x.data_ptr(), rows, k, packed.data_ptr(), scales.data_ptr(), n, group, x_sums.data_ptr(),
                 y.data_ptr())
    return y
