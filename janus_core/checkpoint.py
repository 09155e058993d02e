"""Find and read the weight files of a checkpoint folder, one tensor at a time.

Supported layouts, in order of preference: ``model.safetensors.index.json`` (sharded safetensors),
``model.safetensors``, ``pytorch_model.bin.index.json`` (sharded pickles) and ``pytorch_model.bin``.

safetensors files are parsed here (8-byte little-endian header length, JSON header) and each tensor is
read with plain file I/O (``seek`` + ``readinto``) into a fresh CPU tensor that the caller owns: no
memory map, so no page of the file stays resident behind the caller's back. Tensors are read one at a
time in file order, so a caller that converts or copies each tensor before taking the next holds about
one copy of the weights.

Pickles are read with ``torch.load(weights_only=True, mmap=False)``: a file that needs more than plain
tensors is refused. torch's format has no per-tensor reads, so each pickle file is read whole; its
tensors are then handed out one at a time and dropped from the loaded dict as they go.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _shards_from_index(folder: Path, index_name: str) -> dict[str, list[str]]:
    """Map shard file name -> tensor names, from a HuggingFace ``*.index.json``."""
    path = folder / index_name
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a valid weight index ({exc}); re-download the checkpoint.") from exc
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is incomplete: shard(s) {', '.join(sorted(missing))} listed in {index_name} are missing. "
            "Finish or repeat the download."
        )
    return shards


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of ``folder`` in load order; raises if there are none or a shard is missing."""
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            return [folder / s for s in sorted(_shards_from_index(folder, index_name))]
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"No weights found in {folder}: expected {SAFETENSORS_SINGLE}, {BIN_SINGLE} or a sharded index "
        f"({SAFETENSORS_INDEX} / {BIN_INDEX})."
    )


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
    try:
        header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, str(exc)) from exc
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


def _iter_safetensors(path: Path, destination: Destination | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file in file-offset order, each read into a fresh tensor (no memory map)
    or into ``destination(name)`` when that returns a tensor of its shape (see :func:`_read_tensor`)."""
    if sys.byteorder != "little":
        raise CheckpointError(
            f"Cannot read {path}: safetensors files are little-endian and this machine is {sys.byteorder}-endian."
        )
    with path.open("rb") as fh:
        for entry in _read_safetensors_header(path, fh):
            yield entry.name, _read_tensor(path, fh, entry, destination(entry.name) if destination else None)


def _iter_pickle(path: Path, destination: Destination | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a ``torch.save`` state dict, read whole, then popped and handed out one at a time.

    ``destination`` is not used: the format cannot be read into given memory.
    """
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} contains more than plain tensors and is refused for safety (weights_only loading "
            f"failed: {str(exc).splitlines()[0]}). Use a safetensors copy of this checkpoint."
        ) from exc
    except RuntimeError as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); it may be truncated. Re-download it.") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(value).__name__}, not a tensor.")
    # Pop each tensor before yielding it: once the caller drops it, nothing here keeps it alive.
    for name in list(state):
        yield name, state.pop(name)


def iter_checkpoint(folder: str | Path, destination: Destination | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every stored tensor of the checkpoint in ``folder`` (CPU, stored dtype).

    ``destination(name)`` may return the tensor that should receive ``name``'s values (its final memory,
    e.g. a slice of a joined buffer, in any dtype and on any device). safetensors data is then read into it
    (converted on the way through a small bounce buffer when the dtype or device differs) and that tensor is
    yielded. For another shape or a non-contiguous tensor, and for pickles, a fresh tensor in the stored
    dtype is yielded and the caller copies.
    """
    for path in weight_files(folder):
        logger.info("reading %s", path)
        reader = _iter_safetensors if path.suffix == ".safetensors" else _iter_pickle
        yield from reader(path, destination)
