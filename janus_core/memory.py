"""Free memory of a torch device, and the check that refuses a run which would not fit in it.

A run that does not fit is refused with a :class:`JanusError` before anything large is allocated, instead of
the process being killed by the kernel's OOM killer (inside ComfyUI: the server and the user's queue) or
failing deep inside an allocator. Free memory per device (:func:`free_bytes`):

* CUDA (and ROCm): the driver's free memory (``torch.cuda.mem_get_info``) plus what torch's caching allocator
  holds reserved but unused (it hands that out again without asking the driver).
* Other accelerators whose torch module has ``mem_get_info`` (e.g. XPU): the same without the cache term.
* Apple MPS: ``torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()`` (torch >= 2.5).
* CPU on Linux: ``MemAvailable`` of ``/proc/meminfo`` (swap not counted), capped by the memory cgroup's room
  (containers): the limit minus the usage, plus the inactive page cache the kernel can drop; the tightest
  level of the cgroup hierarchy counts (cgroup v2 ``memory.max`` / ``memory.current``, v1
  ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``).
* Anything else (CPU on macOS / Windows, unknown devices): unknown, and the run is not checked.

Safety margin: a run must leave :data:`MARGIN_FRACTION` of its estimate plus :data:`MARGIN_BYTES` free, for
what the estimates do not model (allocator rounding and fragmentation, kernel workspaces, Python objects).
``JANUS_MEMORY_CHECK=0`` turns the check off (for a setup where the free memory is misreported).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .errors import JanusError

logger = logging.getLogger(__name__)

MARGIN_FRACTION = 0.10
MARGIN_BYTES = 256 * 2**20
CHECK_ENV = "JANUS_MEMORY_CHECK"
GB = 1e9

# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above this is unlimited.
_UNLIMITED = 2**60
# Per cgroup version: (limit file, usage file, memory.stat key of the droppable page cache).
_CGROUP_FILES = {
    2: ("memory.max", "memory.current", "inactive_file"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def meminfo_available(text: str) -> int | None:
    """Bytes available to new allocations from the text of ``/proc/meminfo`` (``MemAvailable``; kernels
    older than 3.14 lack it: ``MemFree + Buffers + Cached`` then)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemAvailable" in fields:
        return fields["MemAvailable"]
    if "MemFree" in fields:
        return fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2 without a limit) -> None


def _stat_value(path: Path, key: str) -> int:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_room(folder: Path, version: int) -> int | None:
    """Limit - usage + inactive page cache of one cgroup folder, or None when it sets no limit."""
    limit_file, usage_file, cache_key = _CGROUP_FILES[version]
    limit = _read_int(folder / limit_file)
    usage = _read_int(folder / usage_file)
    if limit is None or usage is None or limit >= _UNLIMITED:
        return None
    cache = _stat_value(folder / "memory.stat", cache_key)
    return max(limit - max(usage - cache, 0), 0)


def cgroup_available(proc_cgroup: str, root: Path) -> int | None:
    """Room left under the memory limits of this process's cgroups (None: no limit found).

    ``proc_cgroup`` is the text of ``/proc/self/cgroup``; ``root`` the cgroup mount (``/sys/fs/cgroup``: the
    v2 hierarchy there, v1's memory controller in ``root/memory``). Every level from the process's cgroup up to
    the mount counts (a parent's limit binds its children); when the process's path is not visible (a cgroup
    namespace), the mount's own folder is used.
    """
    rooms: list[int] = []
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":
            version, base = 2, root
        elif "memory" in controllers.split(","):
            version, base = 1, root / "memory"
        else:
            continue
        folder = base / rel.strip().lstrip("/")
        while folder != base and not folder.is_dir():
            folder = folder.parent
        while True:
            room = _cgroup_room(folder, version)
            if room is not None:
                rooms.append(room)
            if folder == base:
                break
            folder = folder.parent
    return min(rooms) if rooms else None


def cpu_free_bytes(meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                   cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of RAM this process can still allocate (Linux), or None where that is not known."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        available = meminfo_available(meminfo.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        available = None
    try:
        room = cgroup_available(proc_cgroup.read_text(encoding="ascii"), cgroup_root)
    except (OSError, UnicodeDecodeError):
        room = None
    known = [v for v in (available, room) if v is not None]
    return min(known) if known else None


def _accelerator_free(device: torch.device) -> int | None:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return free + max(cached, 0)
    if device.type == "mps":
        mps = torch.mps
        if not hasattr(mps, "recommended_max_memory"):
            return None
        return max(mps.recommended_max_memory() - mps.current_allocated_memory(), 0)
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "mem_get_info"):
        free, _ = module.mem_get_info(device)
        return free
    return None


def free_bytes(device: torch.device | str) -> int | None:
    """Bytes a new allocation on ``device`` can still get (see the module docstring), or None when unknown."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_free_bytes()
    try:
        return _accelerator_free(device)
    except (RuntimeError, AttributeError) as exc:  # a backend without memory queries
        logger.debug("free memory of %s unknown (%s)", device, exc)
        return None


def required_bytes(needed_bytes: int) -> int:
    """``needed_bytes`` plus the safety margin: what must be free for a run estimated at ``needed_bytes``."""
    return int(needed_bytes * (1.0 + MARGIN_FRACTION)) + MARGIN_BYTES


def _checking() -> bool:
    return os.environ.get(CHECK_ENV, "").strip().lower() not in ("0", "false", "no", "off")


def check_fits(device: torch.device | str, needed_bytes: int, what: str, batch_size: int,
               fix: str = "lower batch_size") -> None:
    """Raise :class:`JanusError` when ``needed_bytes`` (plus the margin) is more than ``device`` has free.

    ``what`` names the run in the message ("JanusFlow generation"); ``fix`` says what to lower when
    ``batch_size`` > 1. Does nothing when the free memory is unknown or the check is turned off.
    """
    if not _checking():
        return
    free = free_bytes(device)
    if free is None:
        logger.debug("%s: free memory of %s unknown; not checked", what, device)
        return
    required = required_bytes(needed_bytes)
    logger.debug("%s: batch %d needs %.2f GB, %.2f GB free on %s", what, batch_size, required / GB, free / GB,
                 device)
    if required > free:
        advice = fix if batch_size > 1 else ("free memory (close other programs, unload other models) or load "
                                             "the model in a smaller dtype")
        raise JanusError(f"{what}: batch {batch_size} needs {required / GB:.2f} GB, {free / GB:.2f} GB free on "
                         f"{torch.device(device)}; {advice}.")


def largest_fitting(device: torch.device | str, count: int, bytes_for: Callable[[int], int], what: str) -> int:
    """The largest ``n <= count`` whose ``bytes_for(n)`` fits ``device`` (``count`` when the check is off or
    the free memory unknown); raises like :func:`check_fits` when not even one fits.

    ``bytes_for`` must grow with ``n``. Used to split a batch into chunks that fit.
    """
    free = free_bytes(device) if _checking() else None
    if free is None or required_bytes(bytes_for(count)) <= free:
        return count
    check_fits(device, bytes_for(1), what, 1)
    low, high = 1, count  # bytes_for(low) fits, bytes_for(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        if required_bytes(bytes_for(mid)) <= free:
            low = mid
        else:
            high = mid
    return low


Progress = Callable[[int, int], None]  # (items done, items in all); raising in it cancels

# With a progress callback, a batch is worked through at most this many images at a time, so progress and Cancel
# come at least that often.
PROGRESS_CHUNK = 4


def fitting_chunks(device: torch.device | str, count: int, bytes_for: Callable[[int], int], what: str,
                   progress: Progress | None = None) -> Iterator[slice]:
    """Consecutive spans of ``count`` items, each as large as fits ``device`` (:func:`largest_fitting`; at most
    :data:`PROGRESS_CHUNK` with ``progress``, which is called ``(items done, count)`` after each span is worked)."""
    chunk = max(largest_fitting(device, count, bytes_for, what), 1)
    if progress is not None:
        chunk = min(chunk, PROGRESS_CHUNK)
    elif chunk < count:
        logger.info("%s: %d images in chunks of %d (free memory)", what, count, chunk)
    for start in range(0, count, chunk):
        yield slice(start, min(start + chunk, count))
        if progress is not None:
            progress(min(start + chunk, count), count)
