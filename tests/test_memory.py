"""janus_core.memory: the free memory of a device (meminfo, cgroups) and the check with its margin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from janus_core import memory
from janus_core.errors import JanusError

GIB = 2**30


@pytest.fixture
def free(monkeypatch):
    """Fake the free memory of every device: ``free(n)`` sets it to ``n`` bytes (None: unknown)."""
    def set_free(n: int | None) -> None:
        monkeypatch.setattr(memory, "free_bytes", lambda device: n)
    return set_free


# --- free memory ------------------------------------------------------------------------------------------

MEMINFO = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nBuffers: 10 kB\n"


def test_meminfo_available():
    assert memory.meminfo_available(MEMINFO) == 20000000 * 1024
    old_kernel = "MemTotal: 8000 kB\nMemFree: 1000 kB\nBuffers: 200 kB\nCached: 300 kB\n"
    assert memory.meminfo_available(old_kernel) == 1500 * 1024
    assert memory.meminfo_available("garbage\n") is None


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


def test_cgroup_v2_tightest_level_counts(tmp_path):
    root = tmp_path / "cgroup"
    leaf = root / "user.slice" / "app.scope"
    write(leaf / "memory.max", "max\n")  # no limit of its own
    write(leaf / "memory.current", "100\n")
    write(root / "user.slice" / "memory.max", str(8 * GIB))
    write(root / "user.slice" / "memory.current", str(6 * GIB))
    write(root / "user.slice" / "memory.stat", f"anon {5 * GIB}\ninactive_file {GIB}\nactive_file 7\n")
    proc = "0::/user.slice/app.scope\n"
    assert memory.cgroup_available(proc, root) == 3 * GIB  # 8 - (6 - 1 droppable)
    write(root / "memory.max", str(7 * GIB))
    write(root / "memory.current", str(6 * GIB))
    assert memory.cgroup_available(proc, root) == GIB  # the root's limit is tighter
    write(tmp_path / "meminfo", MEMINFO)
    write(tmp_path / "cgroup.txt", proc)
    assert memory.cpu_free_bytes(tmp_path / "meminfo", tmp_path / "cgroup.txt", root) == GIB
    write(root / "memory.max", "max\n")
    write(root / "user.slice" / "memory.max", str(64 * GIB))  # the host's available memory is less
    assert memory.cpu_free_bytes(tmp_path / "meminfo", tmp_path / "cgroup.txt", root) == 20000000 * 1024


def test_cgroup_v1_and_namespaces(tmp_path):
    root = tmp_path / "cgroup"
    folder = root / "memory" / "docker" / "abc"
    write(folder / "memory.limit_in_bytes", str(2 * GIB))
    write(folder / "memory.usage_in_bytes", str(GIB + GIB // 2))
    write(folder / "memory.stat", f"cache 9\ninactive_file 1\ntotal_inactive_file {GIB // 4}\n")
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(root / "memory" / "memory.usage_in_bytes", str(40 * GIB))
    proc = "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n"
    assert memory.cgroup_available(proc, root) == GIB // 2 + GIB // 4
    # in a cgroup namespace the listed path is not visible: the mount's own files describe this container
    write(root / "memory" / "memory.limit_in_bytes", str(4 * GIB))
    write(root / "memory" / "memory.usage_in_bytes", str(3 * GIB))
    assert memory.cgroup_available("4:memory:/host/path/not/here\n", root) == GIB
    assert memory.cgroup_available("1:cpu:/x\n", root) is None  # no memory controller: no limit known


def test_free_bytes_of_this_machine():
    free = memory.free_bytes("cpu")
    assert free is not None and 0 < free <= memory.meminfo_available(Path("/proc/meminfo").read_text())
    assert memory.free_bytes(torch.device("meta")) is None


# --- the check --------------------------------------------------------------------------------------------

def test_check_fits_threshold_and_message(free, monkeypatch):
    need = 3 * GIB
    required = memory.required_bytes(need)
    assert required == int(need * (1 + memory.MARGIN_FRACTION)) + memory.MARGIN_BYTES
    free(required)
    memory.check_fits("cpu", need, "Image generation", 4)
    free(required - 1)
    message = f"Image generation: batch 4 needs {required / 1e9:.2f} GB, {(required - 1) / 1e9:.2f} GB free on cpu; "
    with pytest.raises(JanusError, match=re.escape(message + "lower batch_size.")):
        memory.check_fits("cpu", need, "Image generation", 4)
    with pytest.raises(JanusError, match="batch 1 needs .* free memory"):  # nothing to lower
        memory.check_fits("cpu", need, "Image generation", 1)
    free(None)  # unknown: not checked
    memory.check_fits("cpu", 10**15, "Image generation", 4)
    free(0)
    monkeypatch.setenv(memory.CHECK_ENV, "0")
    memory.check_fits("cpu", 10**15, "Image generation", 4)


def test_largest_fitting(free):
    def bytes_for(n):
        return n * GIB

    free(memory.required_bytes(5 * GIB))
    assert memory.largest_fitting("cpu", 12, bytes_for, "decoding") == 5
    assert memory.largest_fitting("cpu", 3, bytes_for, "decoding") == 3
    free(None)
    assert memory.largest_fitting("cpu", 12, bytes_for, "decoding") == 12
    free(memory.required_bytes(GIB) - 1)
    with pytest.raises(JanusError, match="decoding: batch 1 needs"):
        memory.largest_fitting("cpu", 12, bytes_for, "decoding")
