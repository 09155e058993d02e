"""Timing on a shared machine: per-step clocks that know when another process took CPU time.

Every mark reads the wall clock, the machine's busy CPU time (``/proc/stat``) and this process's CPU time
(``/proc/self/stat``). A step is *clean* when other processes used less than ``QUIET_SHARE`` of one core
during it; statistics are taken over clean steps (falling back to all steps, flagged, when too few are
clean). Also: memory bandwidth probes, a peak-RSS sampler, and the table printer.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

QUIET_SHARE = 0.15  # other processes' CPU use (in cores) below which a step counts as clean
QUIET_TIMEOUT = 60.0  # longest wait_quiet() waits by default (seconds)
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds since boot."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLK_TCK


def _own_seconds() -> float:
    """This process's user + system CPU seconds."""
    t = os.times()
    return t.user + t.system


@dataclass
class StepClock:
    """Marks taken after every step (wall clock, machine busy time, own CPU time); see :meth:`steps`.

    ``cuda``: wait for the GPU's queued work before each mark (GPU kernels run asynchronously).
    """

    marks: list[tuple[float, float, float]] = field(default_factory=list)
    cuda: bool = False

    def mark(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), _busy_seconds(), _own_seconds()))

    def __len__(self) -> int:
        return max(len(self.marks) - 1, 0)

    def steps(self) -> list[tuple[float, float]]:
        """``(seconds, other processes' CPU share in cores)`` per step."""
        out = []
        for (w0, b0, o0), (w1, b1, o1) in zip(self.marks, self.marks[1:], strict=False):
            wall = w1 - w0
            out.append((wall, max((b1 - b0) - (o1 - o0), 0.0) / max(wall, 1e-9)))
        return out


@dataclass(frozen=True)
class Timing:
    """Median seconds per step over the clean steps (``clean`` of ``total`` steps were clean)."""

    median: float
    clean: int
    total: int


def summarize(clocks: Sequence[StepClock]) -> Timing:
    """Median step time over ``clocks``: over their clean steps, or over all when fewer than a quarter are."""
    steps = [s for c in clocks for s in c.steps()]
    if not steps:
        raise ValueError("no steps were timed")
    clean = [wall for wall, other in steps if other < QUIET_SHARE]
    pool = clean if len(clean) >= max(3, len(steps) // 4) else [wall for wall, _ in steps]
    return Timing(statistics.median(pool), len(clean), len(steps))


def wait_quiet(timeout: float | None = None, window: float = 1.0) -> bool:
    """Block until other processes use less than ``QUIET_SHARE`` cores over ``window`` s (or ``timeout``,
    default :data:`QUIET_TIMEOUT`)."""
    deadline = time.monotonic() + (QUIET_TIMEOUT if timeout is None else timeout)
    while time.monotonic() < deadline:
        b0, o0 = _busy_seconds(), _own_seconds()
        time.sleep(window)
        if (_busy_seconds() - b0) - (_own_seconds() - o0) < QUIET_SHARE * window:
            return True
    return False


def time_repeated(fn: Callable[[], object], repeats: int = 5) -> Timing:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up, clean calls preferred."""
    fn()
    clock = StepClock()
    clock.mark()
    for _ in range(repeats):
        fn()
        clock.mark()
    return summarize([clock])


def memory_bandwidth(gib: float = 1.0) -> dict[str, float]:
    """Streaming bandwidth probes (GB/s) over a ``gib`` GiB buffer: read-only (sum, dot, GEMV) and copy.

    The ``read`` entry (the best read probe) is what the floor divides by.
    """
    n = int(gib * 2**30) // 4
    x = torch.randn(n)
    y = torch.empty_like(x)
    mat = x.view(-1, 4096)
    vec = torch.randn(4096)
    probes = {
        "sum": (lambda: x.sum(), 4 * n),
        "dot": (lambda: torch.dot(x, x), 4 * n),
        "gemv_fp32": (lambda: torch.mv(mat, vec), 4 * n),
        "copy": (lambda: y.copy_(x), 8 * n),
    }
    out = {name: nbytes / time_repeated(fn, 5).median / 1e9 for name, (fn, nbytes) in probes.items()}
    out["read"] = max(out["sum"], out["dot"], out["gemv_fp32"])
    return out


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * _PAGE


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``) so RSS reflects live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Context manager sampling RSS every ``interval`` s in a thread: ``start``, ``peak`` (bytes)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        """Peak growth over the RSS at entry."""
        return self.peak - self.start


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table (the bench's report) to stdout."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n### {title}\n")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
