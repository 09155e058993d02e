"""Quantized checkpoint folders: written by streaming a source checkpoint, recognised by their
``janus_quantization.json``.

A quantized folder is the source folder's side files (config.json, tokenizer, preprocessor config, ...)
plus ``model.safetensors`` holding the quantized network's state dict in the canonical layout of
:mod:`janus_core.quant.formats` (joined ``qkv_proj`` / ``gate_up_proj`` layers; every other tensor as the
source stored it) and ``janus_quantization.json``::

    {"format": "janus-core-weight-only", "version": 1, "mode": "int4", "group_size": 128,
     "scale_dtype": "bfloat16", "modules": ["language_model.model.layers.0.self_attn.qkv_proj", ...]}

``modules`` lists the quantized layers; the loader refuses names that may not be quantized. Writing streams
the source one tensor at a time (pickles memory-mapped), so it holds about one source tensor at a time and
needs no GPU; the folder is written as ``<name>.partial`` (marked as such, so that a later run deletes only its
own leftovers, never an unfinished download of the same name) and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import (
    BIN_INDEX,
    SAFETENSORS_DTYPES,
    SAFETENSORS_INDEX,
    iter_checkpoint,
    safetensors_names,
    tensor_specs,
    weight_files,
)
from ..config import JanusConfig, LlamaSpec, load_config
from ..errors import CheckpointError, JanusError, model_files
from ..jsonfile import JsonFields, read_json
from . import formats
from .linear import EMBEDDINGS, LM_HEAD, QuantWeights, check_modules, quantize_modules, standard_modules

logger = logging.getLogger(__name__)

QUANT_FILE = "janus_quantization.json"
FORMAT = "janus-core-weight-only"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
PARTIAL_SUFFIX = ".partial"
PARTIAL_MARK = ".janus-quantize"  # in <name>.partial while writing: only such a folder is ever deleted
# Names of the stored tensors of a quantized layer end so (QuantWeights' parameters).
QUANTIZED_SUFFIXES = (".qweight", ".qscale")
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class QuantizedFolder:
    """What a folder's ``janus_quantization.json`` says: the ``mode`` and the quantized layer names."""

    mode: str
    modules: tuple[str, ...]

    @property
    def lm_head(self) -> bool:
        return LM_HEAD in self.modules

    @property
    def embeddings(self) -> bool:
        return EMBEDDINGS in self.modules


def read_quantization(folder: str | Path) -> QuantizedFolder | None:
    """The quantization of the checkpoint in ``folder``, or None when it is not a quantized folder. Refuses
    quantized tensors without the file that describes them (a folder copied or uploaded without it)."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        orphans = [name for name in safetensors_names(folder) if name.endswith(QUANTIZED_SUFFIXES)]
        if orphans:
            raise CheckpointError(
                f"{folder} holds weight-only quantized tensors ({', '.join(orphans[:2])}, ...) but no {QUANT_FILE}, "
                f"which says how they were quantized: the folder is incomplete. Copy {QUANT_FILE} back from the "
                "quantized folder it came from (python -m janus_core quantize writes it next to the weights), or "
                "quantize the original checkpoint again."
            )
        return None
    fields = JsonFields(str(path), "", read_json(path))
    if fields.text("format") != FORMAT:
        raise fields.fail("format", f"is not '{FORMAT}'")
    version = fields.integer("version", 1, 1 << 20)
    if version != VERSION:
        raise CheckpointError(f"{path} is version {version} of the quantized format; this janus_core reads version "
                              f"{VERSION}. Update ComfyUI-Janus, or quantize the original checkpoint again.")
    mode = fields.text("mode")
    if mode not in formats.MODES:
        raise fields.fail("mode", f"is '{mode}', not one of {', '.join(formats.MODES)}")
    if mode == "int4" and fields.integer("group_size", 1, 1 << 20) != formats.INT4_GROUP:
        raise fields.fail("group_size", f"is not {formats.INT4_GROUP}, the group size this janus_core writes")
    if fields.text("scale_dtype") != str(formats.SCALE_DTYPE).removeprefix("torch."):
        raise fields.fail("scale_dtype", f"is not {str(formats.SCALE_DTYPE).removeprefix('torch.')}")
    modules = fields.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise fields.fail("modules", "must be a non-empty list of layer names")
    repeated = sorted({m for m in modules if modules.count(m) > 1})
    if repeated:
        raise fields.fail("modules", f"names '{repeated[0]}' more than once")
    return QuantizedFolder(mode, tuple(modules))


def quantized_llm_elements(spec: LlamaSpec, mode: str, lm_head: bool, embeddings: bool) -> int:
    """Values a quantized folder stores for the language model (what ``LlamaSpec.parameter_count`` is for a
    full-precision one): norms as they are, every linear layer, and ``lm_head`` / the token embedding when they
    are quantized, in ``mode``'s layout."""
    h, inter, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    shapes = [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)]
    per_layer = sum(formats.stored_elements(mode, n, k) - n * k for n, k in shapes)
    table = formats.stored_elements(mode, spec.vocab_size, h) - spec.vocab_size * h
    return spec.parameter_count + spec.num_hidden_layers * per_layer + table * (int(lm_head) + int(embeddings))


class _StreamWriter:
    """A safetensors file whose header (every tensor's shape and dtype) is written first; data then arrives in
    any order and in row ranges. :meth:`close` checks that every byte was written."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        header, offset = {}, 0
        self._entries: dict[str, tuple[int, int, int]] = {}  # name -> (start, size, bytes per row)
        for name, (shape, dtype) in specs.items():
            size = dtype.itemsize
            for d in shape:
                size *= d
            row = size // shape[0] if shape and shape[0] else size
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._entries[name] = (offset, size, row)
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self._written = dict.fromkeys(specs, 0)
        self._fh = path.open("wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._fh.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write ``tensor`` (CPU) as rows ``first_row...`` of the tensor ``name`` (all of it by default)."""
        start, size, row = self._entries[name]
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if first_row * row + len(data) > size:
            raise JanusError(f"internal: {name} overflows its {size} bytes")
        self._fh.seek(self._data_start + start + first_row * row)
        self._fh.write(data)
        self._written[name] += len(data)

    def close(self) -> list[str]:
        """Close the file; returns the tensors not (fully) written."""
        self._fh.close()
        return [n for n, (_, size, _) in self._entries.items() if self._written[n] != size]


def _build_meta_net(config: JanusConfig) -> torch.nn.Module:
    from ..modules.composite import JanusARNet, JanusFlowNet

    with torch.device("meta"):
        return JanusFlowNet(config) if config.is_flow else JanusARNet(config)


def _side_files(source: Path) -> list[Path]:
    """The source folder's files besides its weights (config, tokenizer, preprocessor, README, ...)."""
    skip = {p.resolve() for p in weight_files(source)} | {(source / n).resolve() for n in (SAFETENSORS_INDEX,
                                                                                         BIN_INDEX)}
    return [p for p in sorted(source.iterdir()) if p.is_file() and p.resolve() not in skip]


def save_quantized(source: str | Path, destination: str | Path, mode: str, *, lm_head: bool = True,
                   embeddings: bool = True, variant: str | None = None) -> Path:
    """Write the checkpoint in ``source`` as a quantized folder ``destination`` (``mode`` ``"int8"``/``"int4"``);
    returns ``destination``. ``load_model(destination)`` then loads it without quantizing again.

    Streams the source one tensor at a time (about one tensor in RAM, plus the quantized rows of a joined layer
    whose other parts come later); the CPU does the work, no GPU is needed. ``lm_head`` / ``embeddings``: quantize
    those too (as ``load_model``'s ``quantize_lm_head`` / ``quantize_embeddings``). ``variant`` as for ``load_model``.
    """
    from ..model import is_unused_key

    source, destination = Path(source).expanduser(), Path(destination).expanduser()
    with model_files(str(source)):  # an unreadable source, an unwritable destination: named
        formats.check_mode(mode)
        if read_quantization(source) is not None:
            raise JanusError(f"{source} is already a quantized folder; quantize the original checkpoint instead.")
        if destination.exists():
            raise JanusError(f"{destination} already exists; choose a new folder for the quantized checkpoint.")
        config = load_config(source, variant=variant)
        net = _build_meta_net(config)
        names = standard_modules(net, lm_head, embeddings)
        targets = quantize_modules(net, mode, names)
        stored = tensor_specs(source)
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, meta in net.state_dict().items():
            if name.rsplit(".", 1)[0] in names and name.rsplit(".", 1)[1] in ("qweight", "qscale"):
                specs[name] = (tuple(meta.shape), meta.dtype)
            elif name in stored and stored[name][0] == tuple(meta.shape):
                specs[name] = stored[name]
            else:
                found = f"holds {list(stored[name][0])}" if name in stored else "lacks it"
                raise CheckpointError(f"{source} does not match its config.json: '{name}' should be "
                                      f"{list(meta.shape)} but the checkpoint {found}. Re-download the checkpoint.")
        partial = destination.with_name(destination.name + PARTIAL_SUFFIX)
        if partial.is_symlink() or partial.exists():
            if partial.is_symlink() or not (partial / PARTIAL_MARK).is_file():
                raise JanusError(f"{partial} exists and is not a folder an earlier quantize run left behind (it may "
                                 "be an unfinished download); move it away or choose another output folder.")
            shutil.rmtree(partial)  # an interrupted earlier run
        partial.mkdir(parents=True)
        (partial / PARTIAL_MARK).write_text("an unfinished `python -m janus_core quantize` run\n", encoding="utf-8")
        writer = _StreamWriter(partial / WEIGHTS_FILE, specs)
        try:
            for name, tensor in iter_checkpoint(source, stream=True, by_rows=targets.__contains__):
                target = targets.get(name)
                if target is not None:
                    if tuple(tensor.shape) != (target.stop - target.start, target.module.in_features):
                        raise CheckpointError(f"{source}: '{name}' has shape {list(tensor.shape)}, which does not "
                                              "match config.json. Re-download the checkpoint.")
                    for first, block in tensor:
                        for key, part in zip(("qweight", "qscale"), formats.quantize(block, mode), strict=True):
                            writer.write(f"{target.module_name}.{key}", part, target.start + first)
                elif name in specs:
                    writer.write(name, tensor)
                elif not is_unused_key(name):
                    raise CheckpointError(f"{source} holds '{name}', which config.json does not describe. Re-download "
                                          "the checkpoint or check config.json.")
        finally:
            missing = writer.close()
        if missing:
            raise CheckpointError(f"{source} lacks {len(missing)} tensor(s) config.json describes: "
                                  f"{', '.join(missing[:10])}. Re-download the checkpoint.")
        for path in _side_files(source):
            shutil.copyfile(path, partial / path.name)
        record = {"format": FORMAT, "version": VERSION, "mode": mode, "group_size": formats.INT4_GROUP,
                  "scale_dtype": str(formats.SCALE_DTYPE).removeprefix("torch."), "modules": names}
        (partial / QUANT_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        (partial / PARTIAL_MARK).unlink()
        partial.rename(destination)
        logger.info("wrote the %s checkpoint %s (%d quantized layers)", mode, destination, len(names))
        return destination


def check_folder(folder: Path, quantized: QuantizedFolder, net: torch.nn.Module, requested: str | None) -> None:
    """Refuse a quantized folder that ``load_model`` cannot load as asked: another ``requested`` mode, layers
    that may not be quantized, weight files that are not safetensors. Run before the layers are replaced."""
    if requested is not None and requested != quantized.mode:
        raise JanusError(
            f"{folder} holds {quantized.mode} weights (see {QUANT_FILE}), so it cannot be loaded as {requested}. "
            f"Load it as {quantized.mode} or auto (library: quantize={quantized.mode!r} or None; command line: "
            f"--dtype {quantized.mode} or auto; loader node: {quantized.mode} or auto), or quantize the original "
            f"checkpoint to {requested}."
        )
    check_modules(net, list(quantized.modules), str(folder / QUANT_FILE))
    if any(p.suffix != ".safetensors" for p in weight_files(folder)):
        raise CheckpointError(f"{folder} is a quantized folder but holds .bin weight files; quantized folders are "
                              "safetensors only. Quantize the original checkpoint again.")


def check_stored_dtypes(folder: Path, layers: dict[str, QuantWeights]) -> None:
    """Refuse quantized tensors of ``folder`` whose stored dtype is not their format's (the reader would convert
    them silently). Run after the layers are replaced."""
    stored = tensor_specs(folder)
    for name, layer in layers.items():
        for key, (_, dtype) in formats.stored_shapes(layer.mode, layer.out_features, layer.in_features).items():
            found = stored.get(f"{name}.{key}")
            if found is not None and found[1] != dtype:
                raise CheckpointError(f"{folder}: '{name}.{key}' is {str(found[1]).removeprefix('torch.')}, not "
                                      f"{str(dtype).removeprefix('torch.')} as {layer.mode} weights are. "
                                      "Quantize the original checkpoint again.")
