"""Find and read the weight files of a checkpoint folder, one tensor at a time.

Supported layouts, in order of preference: ``model.safetensors.index.json`` (sharded safetensors),
``model.safetensors``, ``pytorch_model.bin.index.json`` (sharded pickles) and ``pytorch_model.bin``.
Pickles are read with ``torch.load(weights_only=True, mmap=True)``: a file that needs more than plain
tensors is refused. Tensors are handed out one at a time so a caller can convert each to its final
dtype and device before the next is read (no second full copy of the model in memory).
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

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


def _check_safetensors_complete(path: Path) -> None:
    """Raise if the file is shorter than its header says (an interrupted download)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes); re-download it.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file; re-download it.")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} has a corrupt header ({exc}); re-download it.") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes on disk, {8 + header_len + end} expected. Re-download it."
        )


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    _check_safetensors_complete(path)
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        for name in fh.keys():
            yield name, fh.get_tensor(name)


def _iter_pickle(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} contains more than plain tensors and is refused for safety (weights_only loading "
            f"failed: {str(exc).splitlines()[0]}). Use a safetensors copy of this checkpoint."
        ) from exc
    except RuntimeError as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); it may be truncated. Re-download it.") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(tensor).__name__}, not a tensor.")
        yield name, tensor


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every stored tensor of the checkpoint in ``folder`` (CPU, stored dtype)."""
    for path in weight_files(folder):
        logger.info("reading %s", path)
        reader = _iter_safetensors if path.suffix == ".safetensors" else _iter_pickle
        yield from reader(path)
