"""Find and read the weight files of a checkpoint folder, one tensor at a time.

Supported layouts, in order of preference: ``model.safetensors.index.json`` (sharded safetensors),
``model.safetensors``, ``pytorch_model.bin.index.json`` (sharded pickles) and ``pytorch_model.bin``.

safetensors files are parsed here (8-byte little-endian header length, JSON header) and each tensor is
read with plain file I/O (``seek`` + ``readinto``) into a fresh CPU tensor that the caller owns: no
memory map, so no page of the file stays resident behind the caller's back. Tensors are read one at a
time in file order, so a caller that converts or copies each tensor before taking the next holds about
one copy of the weights.

Pickles are read with ``torch.load(weights_only=True, mmap=False)``, and only on torch >= 2.6: before
2.6 ``weights_only`` can be bypassed by a crafted file (CVE-2025-32434). A file that needs more than plain
tensors is refused. torch's format has no per-tensor reads, so each pickle file is read whole; its
tensors are then handed out one at a time and dropped from the loaded dict as they go. Callers that
convert every tensor as it comes (quantization) stream instead: the file is memory-mapped and each
tensor's pages are given back once it has been converted (``iter_checkpoint(stream=True)``).

Only files inside the model folder are read: shard names in an index must be relative paths that stay
inside it (no ``..``, no absolute paths or drive letters, no directory that is a symbolic link leading out).
The shard file itself may be a symbolic link, as the Hugging Face cache and older ``huggingface_hub``
downloads make them: it is the folder's own entry under the name the index gives.

:func:`stored_size` measures the tensor data of every weight file from headers and zip directories
alone, so the loader can compare it with what config.json implies before allocating anything.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import mmap
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import torch

from .errors import CheckpointError
from .jsonfile import kind, read_json

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _shard_path(folder: Path, index_path: Path, shard: object, suffix: str) -> Path:
    """The file that the shard name ``shard`` of ``index_path`` refers to, refused unless inside ``folder``."""
    fix = "The index is damaged or was crafted; re-download the checkpoint from its original repository."
    if not isinstance(shard, str) or not shard.strip() or "\0" in shard:
        raise CheckpointError(f"{index_path} names a shard {kind(shard)} {shard!r:.60}, not a file name. {fix}")
    posix, windows = PurePosixPath(shard), PureWindowsPath(shard)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(
            f"{index_path} names the shard '{shard}', which is outside the model folder {folder}; refused. {fix}")
    if not shard.endswith(suffix):
        raise CheckpointError(f"{index_path} names the shard '{shard}', which is not a {suffix} file. {fix}")
    path = folder / shard
    root, parent = folder.resolve(), path.parent.resolve()
    if parent != root and root not in parent.parents:
        raise CheckpointError(
            f"{index_path} names the shard '{shard}', whose folder {parent} (through a symbolic link) is outside "
            f"the model folder {root}; refused. Put the shard files into the model folder itself.")
    return path


def _shards_from_index(folder: Path, index_name: str) -> dict[Path, list[str]]:
    """Map shard file -> tensor names, from a HuggingFace ``*.index.json`` (checked: see the module docstring)."""
    path = folder / index_name
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty object" if weight_map == {} else kind(weight_map)
        raise CheckpointError(
            f"{path} is not a valid weight index: 'weight_map' must be an object mapping tensor names to shard "
            f"files, found {found}. Re-download the checkpoint."
        )
    suffix = ".safetensors" if index_name == SAFETENSORS_INDEX else ".bin"
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(_shard_path(folder, path, shard, suffix), []).append(name)
    missing = [p.relative_to(folder).as_posix() for p in shards if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is incomplete: shard(s) {', '.join(sorted(missing))} listed in {index_name} are missing. "
            "Finish or repeat the download."
        )
    return shards


def _weight_layout(folder: Path) -> dict[Path, list[str] | None]:
    """The weight files of ``folder`` in load order, each with the tensor names its index places in it (None
    for a single unindexed file); raises if there are none or a shard is missing."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            shards = _shards_from_index(folder, index_name)
            return {path: shards[path] for path in sorted(shards)}
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return {folder / single: None}
    raise CheckpointError(
        f"No weights found in {folder}: expected {SAFETENSORS_SINGLE}, {BIN_SINGLE} or a sharded index "
        f"({SAFETENSORS_INDEX} / {BIN_INDEX})."
    )


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of ``folder`` in load order; raises if there are none or a shard is missing."""
    return list(_weight_layout(Path(folder)))


def _dtype_table() -> dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes (float8 only where this torch has it)."""
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }
    for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


SAFETENSORS_DTYPES = _dtype_table()


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets) and how to view them."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return (self.end - self.start) // self.dtype.itemsize


# The safetensors format's own limit on the JSON header (the files of the releases have headers of ~100 kB).
MAX_HEADER_BYTES = 100_000_000


def _type_name(dtype: torch.dtype) -> str:
    """``int16`` for ``torch.int16``; floating-point dtypes as "floating-point (bfloat16)"."""
    name = str(dtype).removeprefix("torch.")
    return f"floating-point ({name})" if dtype.is_floating_point else name


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} has a corrupt header ({why}); re-download it.")


def _parse_entry(path: Path, name: str, info: object, data_start: int) -> _Entry:
    """Validate one header entry and turn its relative ``data_offsets`` into absolute file offsets."""
    if not isinstance(info, dict):
        raise _corrupt(path, f"entry '{name}' is not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor '{name}' has invalid data_offsets {offsets!r}")
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor '{name}' has dtype {dtype_name!r}, which is not supported "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)})."
        )
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path} is corrupt: tensor '{name}' ({dtype_name} {shape}) needs {expected} bytes but its "
            f"data_offsets {offsets} span {offsets[1] - offsets[0]}. Re-download it."
        )
    return _Entry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _read_safetensors_header(path: Path, fh: BinaryIO) -> list[_Entry]:
    """Parse the header of the open safetensors file ``fh``; entries sorted by file offset.

    Raises if the header is corrupt or the file is shorter than its header says (an interrupted download).
    """
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes); re-download it.")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download it.")
    if header_len > MAX_HEADER_BYTES:
        raise _corrupt(path, f"a header of {header_len} bytes is beyond the format's limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, str(exc)) from exc
    except RecursionError as exc:
        raise _corrupt(path, "its JSON is nested too deeply") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, f"expected a JSON object, found {type(header).__name__}")
    data_start = 8 + header_len
    entries = sorted(
        (_parse_entry(path, name, info, data_start) for name, info in header.items() if name != "__metadata__"),
        key=lambda e: (e.start, e.end),
    )
    for prev, cur in zip(entries, entries[1:], strict=False):
        if cur.start < prev.end:
            raise _corrupt(path, f"the data of tensors '{prev.name}' and '{cur.name}' overlap")
    end = max((e.end for e in entries), default=data_start)
    if end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes on disk, {end} expected. Re-download it.")
    return entries


CHUNK_BYTES = 64 << 20  # bounce-buffer size when a tensor is converted while it is read


def _read_bytes(path: Path, fh: BinaryIO, entry: _Entry, start: int, view: memoryview) -> None:
    """Fill ``view`` with the entry's bytes from offset ``start`` (relative to the entry) on."""
    fh.seek(entry.start + start)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise CheckpointError(
                f"{path} is truncated: tensor '{entry.name}' ends at byte {entry.end} but the file ended "
                f"at byte {entry.start + start + done}. Re-download it."
            )
        done += n


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, whatever its dtype (bf16 included).

    ``reshape(-1)`` is a view of a contiguous tensor (and works for 0-dim ones); its uint8 view's numpy array
    shares the tensor's memory.
    """
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _read_tensor(path: Path, fh: BinaryIO, entry: _Entry, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with ``seek`` + ``readinto``: into ``out`` if given, else into a fresh CPU tensor.

    ``out`` (contiguous, the entry's shape) may have another dtype or device: the bytes then pass through a
    bounce buffer of at most :data:`CHUNK_BYTES` and are converted chunk by chunk, so converting a checkpoint
    never holds more than the destination plus one chunk. An ``out`` of another shape is ignored.
    """
    if out is None or tuple(out.shape) != entry.shape or not out.is_contiguous():
        out = None
    if out is not None and out.dtype.is_floating_point != entry.dtype.is_floating_point:
        raise CheckpointError(f"{path}: tensor '{entry.name}' is stored as {_type_name(entry.dtype)}, but it is a "
                              f"{_type_name(out.dtype)} weight: the file is damaged or belongs to another model. "
                              "Re-download it.")
    direct = out is not None and out.device.type == "cpu" and out.dtype == entry.dtype
    if out is None or direct:
        tensor = out if direct else torch.empty(entry.shape, dtype=entry.dtype)
        if entry.end > entry.start:
            _read_bytes(path, fh, entry, 0, _byte_view(tensor))
        return tensor
    itemsize = entry.dtype.itemsize
    numel = (entry.end - entry.start) // itemsize
    per_chunk = max(1, CHUNK_BYTES // itemsize)
    bounce = torch.empty(min(numel, per_chunk), dtype=entry.dtype)
    flat = out.view(-1)
    for first in range(0, numel, per_chunk):
        n = min(per_chunk, numel - first)
        _read_bytes(path, fh, entry, first * itemsize, _byte_view(bounce[:n]))
        flat[first:first + n].copy_(bounce[:n])
    return out


Destination = Callable[[str], torch.Tensor | None]


@dataclass(frozen=True)
class RowBlocks:
    """A stored tensor handed out as blocks of whole rows, each read when the iteration reaches it (about
    :data:`CHUNK_BYTES` per block): iterating yields ``(first row, block)``. Valid until the next tensor of
    the checkpoint is asked for."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]  # (first row, row count) -> those rows

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        row_bytes = self.dtype.itemsize
        for d in self.shape[1:]:
            row_bytes *= d
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        for first in range(0, self.shape[0], step):
            yield first, self.read(first, min(step, self.shape[0] - first))

    @classmethod
    def of(cls, tensor: torch.Tensor) -> RowBlocks:
        """Blocks of rows of a tensor already at hand."""
        return cls(tuple(tensor.shape), tensor.dtype, lambda first, count: tensor[first:first + count])


def _read_rows(path: Path, fh: BinaryIO, entry: _Entry, first: int, count: int) -> torch.Tensor:
    """Rows ``first:first + count`` of a safetensors entry, read into a fresh tensor."""
    rows = torch.empty((count, *entry.shape[1:]), dtype=entry.dtype)
    if rows.numel():
        _read_bytes(path, fh, entry, first * (rows.numel() // count) * entry.dtype.itemsize, _byte_view(rows))
    return rows


RowsWanted = Callable[[str], bool]


def _iter_safetensors(path: Path, destination: Destination | None = None, by_rows: RowsWanted | None = None
                      ) -> Iterator[tuple[str, torch.Tensor | RowBlocks]]:
    """Tensors of a safetensors file in file-offset order, each read into a fresh tensor (no memory map)
    or into ``destination(name)`` when that returns a tensor of its shape (see :func:`_read_tensor`);
    :class:`RowBlocks` for the tensors of at least one dimension that ``by_rows(name)`` asks for."""
    if sys.byteorder != "little":
        raise CheckpointError(
            f"Cannot read {path}: safetensors files are little-endian and this machine is {sys.byteorder}-endian."
        )
    with path.open("rb") as fh:
        for entry in _read_safetensors_header(path, fh):
            if by_rows is not None and entry.shape and by_rows(entry.name):
                yield entry.name, RowBlocks(entry.shape, entry.dtype,
                                            lambda first, count, e=entry: _read_rows(path, fh, e, first, count))
                continue
            yield entry.name, _read_tensor(path, fh, entry, destination(entry.name) if destination else None)


# torch versions before 2.6 let a crafted pickle run code despite weights_only=True (CVE-2025-32434).
PICKLE_TORCH_FLOOR = (2, 6)


def _torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch; (0, 0) when its version string cannot be read."""
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _require_safe_unpickler(path: Path) -> None:
    """Refuse to unpickle ``path`` on a torch whose ``weights_only`` loading can be bypassed."""
    if _torch_version() < PICKLE_TORCH_FLOOR:
        floor = ".".join(map(str, PICKLE_TORCH_FLOOR))
        raise CheckpointError(
            f"{path} is a pickle (.bin) checkpoint and this torch ({torch.__version__}) is older than {floor}: "
            "its weights_only loading can be bypassed by a crafted file to run code (CVE-2025-32434), so .bin "
            f"files are refused. Upgrade torch to {floor} or newer, or use a safetensors copy of this checkpoint "
            "(safetensors files load on every torch)."
        )


def _pickle_data_bytes(path: Path) -> int:
    """Bytes of tensor data in the ``torch.save`` zip archive ``path``, from its zip directory (nothing is
    unpickled); refuses empty, truncated and foreign files with a clear message."""
    fix = "The download is incomplete or this is not a PyTorch checkpoint; re-download it."
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes). {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path} ({size} bytes) is not a complete torch.save archive ({exc}). {fix}") from exc
    if not any(PurePosixPath(m.filename).name == "data.pkl" for m in members):
        raise CheckpointError(f"{path} is a zip file without data.pkl, not a torch.save archive. {fix}")
    return sum(m.file_size for m in members if PurePosixPath(m.filename).parent.name == "data")


def _unpickler_reason(exc: Exception) -> str:
    """The specific part of a ``weights_only`` failure ("Unsupported global: ...", "Unsupported operand ...")."""
    text = str(exc)
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _load_pickle(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    """The state dict of the ``torch.save`` file ``path``, checked to be names -> tensors.

    ``mmap=False`` reads the whole file; ``mmap=True`` maps it (private, read-only use), so tensor data is
    read from the file only when touched.
    """
    _require_safe_unpickler(path)
    _pickle_data_bytes(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:  # not a sign of a damaged file: let it through as it is
        raise
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if "global" not in reason.lower():
            raise CheckpointError(f"{path} is corrupt ({reason}); re-download it.") from exc
        raise CheckpointError(
            f"{path} contains more than plain tensors and is refused for safety (weights_only loading "
            f"failed: {reason}). Use a safetensors copy of this checkpoint."
        ) from exc
    except Exception as exc:  # torch.load reports damaged archives with many exception types
        raise CheckpointError(
            f"{path} could not be read ({type(exc).__name__}: {str(exc)[:200]}); it is corrupt or truncated. "
            "Re-download it."
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: the state dict has a key {name!r:.60}, not a tensor name.")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(value).__name__}, not a tensor.")
    return state


_MADV_DONTNEED = 4


@functools.lru_cache(maxsize=4)
def _libc_function(name: str, argtypes: tuple) -> Callable[..., int] | None:
    """The C library's function ``name`` on Linux (glibc, musl), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


def _madvise() -> Callable[[int, int, int], int] | None:
    return _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere). Streaming a
    checkpoint through conversions frees many mid-sized buffers that the allocator would otherwise keep."""
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is not None:
        trim(0)


def _release_pages(tensor: torch.Tensor) -> None:
    """Give the whole memory pages of the memory-mapped ``tensor`` back to the system (Linux; a no-op elsewhere).

    The mapping is private and never written, so a page touched again is simply re-read from the file.
    """
    madvise = _madvise()
    if madvise is None or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        madvise(start, end - start, _MADV_DONTNEED)


def _iter_pickle(path: Path, destination: Destination | None = None, stream: bool = False,
                 by_rows: RowsWanted | None = None) -> Iterator[tuple[str, torch.Tensor | RowBlocks]]:
    """Tensors of a ``torch.save`` state dict, popped and handed out one at a time (:class:`RowBlocks` of
    them where ``by_rows(name)`` asks for it).

    The file is read whole, or with ``stream`` memory-mapped, each tensor's pages given back once the caller
    asks for the next one (so the caller must have copied or converted it by then): reading then holds about
    one tensor of the file at a time. ``destination`` is not used: the format cannot be read into given memory.
    """
    state = _load_pickle(path, mmap=stream)
    # Pop each tensor before yielding it: once the caller drops it, nothing here keeps it alive.
    for name in list(state):
        tensor = state.pop(name)
        blocks = by_rows is not None and tensor.dim() > 0 and by_rows(name)
        yield name, RowBlocks.of(tensor) if blocks else tensor
        if stream:
            _release_pages(tensor)


@dataclass(frozen=True)
class StoredSize:
    """The tensor data of a checkpoint, measured without reading it.

    ``elements``: values in safetensors files (their headers give every tensor's dtype and shape);
    ``pickle_bytes``: bytes of tensor data in ``.bin`` files (their dtypes are inside the pickle).
    """

    elements: int
    pickle_bytes: int


def _header_entries(path: Path) -> list[_Entry]:
    """The tensors listed in the header of the safetensors file ``path`` (see :func:`_read_safetensors_header`)."""
    with path.open("rb") as fh:
        return _read_safetensors_header(path, fh)


def _duplicate(name: str, first: Path, second: Path) -> CheckpointError:
    return CheckpointError(
        f"The tensor '{name}' is stored twice, in {first.name} and in {second.name} of {first.parent}: the folder "
        "mixes files of different downloads or versions. Re-download the checkpoint into an empty folder.")


def _claim(seen: dict[str, Path], name: str, path: Path) -> None:
    """Record that ``path`` stores the tensor ``name``; refuse a second file storing it."""
    if name in seen:
        raise _duplicate(name, seen[name], path)
    seen[name] = path


def _weight_headers(folder: str | Path) -> Iterator[tuple[Path, list[_Entry] | None]]:
    """Every weight file of ``folder`` with its safetensors header entries (None for a ``.bin``), checked across
    files: no tensor stored in two files, and every tensor an index places in a shard found in that shard."""
    folder = Path(folder)
    seen: dict[str, Path] = {}
    for path, listed in _weight_layout(folder).items():
        if path.suffix != ".safetensors":
            yield path, None
            continue
        entries = _header_entries(path)
        for entry in entries:
            _claim(seen, entry.name, path)
        absent = sorted(set(listed or ()) - {e.name for e in entries})
        if absent:
            raise CheckpointError(
                f"{folder / SAFETENSORS_INDEX} places {len(absent)} tensor(s) in {path.name} that it does not hold "
                f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}): the index and the shards come from "
                "different downloads or versions. Re-download the checkpoint into an empty folder.")
        yield path, entries


def stored_size(folder: str | Path, skip: Callable[[str], bool] | None = None) -> StoredSize:
    """Measure every weight file of ``folder``; safetensors tensors named so that ``skip(name)`` is true are
    not counted. Checks each file's container on the way (safetensors header, zip directory, the torch
    version for pickles), so a broken file is reported before anything is allocated."""
    elements = pickle_bytes = 0
    for path, entries in _weight_headers(folder):
        if entries is not None:
            elements += sum(e.numel for e in entries if skip is None or not skip(e.name))
        else:
            _require_safe_unpickler(path)
            pickle_bytes += _pickle_data_bytes(path)
    return StoredSize(elements, pickle_bytes)


def iter_checkpoint(folder: str | Path, destination: Destination | None = None, *, stream: bool = False,
                    by_rows: RowsWanted | None = None) -> Iterator[tuple[str, torch.Tensor | RowBlocks]]:
    """Yield ``(name, tensor)`` for every stored tensor of the checkpoint in ``folder`` (CPU, stored dtype).

    ``destination(name)`` may return the tensor that should receive ``name``'s values (its final memory,
    e.g. a slice of a joined buffer, in any dtype and on any device). safetensors data is then read into it
    (converted on the way through a small bounce buffer when the dtype or device differs) and that tensor is
    yielded. For another shape or a non-contiguous tensor, and for pickles, a fresh tensor in the stored
    dtype is yielded and the caller copies.

    ``stream=True`` is for callers that convert every tensor before asking for the next (quantization):
    pickles are then memory-mapped instead of read whole, and a yielded tensor that is not a ``destination``
    is only valid until the next one is asked for. Tensors named so that ``by_rows(name)`` is true come as
    :class:`RowBlocks`, read a block of rows at a time (a 0.8 GB embedding table never whole in memory).
    """
    seen: dict[str, Path] = {}
    for path in weight_files(folder):
        logger.info("reading %s", path)
        tensors = (_iter_safetensors(path, destination, by_rows) if path.suffix == ".safetensors" else
                   _iter_pickle(path, destination, stream, by_rows))
        for name, tensor in tensors:
            _claim(seen, name, path)
            yield name, tensor


def safetensors_names(folder: str | Path) -> list[str]:
    """Names of the tensors in the safetensors files of ``folder``, from their headers (``.bin`` files are not
    opened)."""
    return [e.name for _, entries in _weight_headers(folder) for e in entries or ()]


def tensor_specs(folder: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``name -> (shape, dtype)`` of every stored tensor, from safetensors headers and memory-mapped pickles
    (no tensor data is read)."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    where: dict[str, Path] = {}
    for path, entries in _weight_headers(folder):
        found = ([(e.name, e.shape, e.dtype) for e in entries] if entries is not None else
                 [(n, tuple(t.shape), t.dtype) for n, t in _load_pickle(path, mmap=True).items()])
        for name, shape, dtype in found:
            _claim(where, name, path)
            specs[name] = (shape, dtype)
    return specs
