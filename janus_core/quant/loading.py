"""Quantized layers filled while a checkpoint streams by: quantize-while-loading and quantized folders.

Each quantized layer (:class:`~janus_core.quant.linear.QuantWeights`) collects its canonical tensors in CPU memory
(full-precision rows are quantized on the CPU as they arrive, a quantized folder's tensors are read straight in) and is
installed on the target device, laid out for its kernel, as soon as all of its rows are in. So the CPU holds
the quantized weights plus the layers still being assembled, and a GPU never sees a full-precision copy of a
quantized layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import RowBlocks
from . import formats
from .linear import QuantWeights, Target, quant_layers

logger = logging.getLogger(__name__)

QUANT_KEYS = ("qweight", "qscale")


@dataclass
class _Staged:
    """The CPU canonical tensors of one layer while it is assembled, and what has arrived."""

    qweight: torch.Tensor
    qscale: torch.Tensor
    rows: int = 0
    keys: set[str] = field(default_factory=set)


class QuantizedLayers:
    """The quantized layers of a meta-device ``net`` while its checkpoint is read.

    ``targets`` (from :func:`~janus_core.quant.linear.quantize_modules`) maps full-precision source weights to
    layer rows for quantize-while-loading; without it the checkpoint is a quantized folder holding each layer's
    ``qweight`` / ``qscale``. ``dtype_of(layer name)`` is the layer's compute dtype. With ``prepare`` each layer
    is laid out for the kernel of ``device`` when it is installed (``fallback`` as in
    :func:`~janus_core.quant.kernels.kernel_for`); otherwise it stays canonical, to be prepared on the device it
    will run on (:meth:`QuantWeights.prepare`).
    """

    def __init__(self, net: nn.Module, device: torch.device, dtype_of: Callable[[str], torch.dtype],
                 targets: dict[str, Target] | None, *, prepare: bool, fallback: bool):
        self.layers = quant_layers(net)
        self.targets = targets
        self.device, self.dtype_of, self.prepare, self.fallback = device, dtype_of, prepare, fallback
        self._staged: dict[str, _Staged] = {}
        self.installed: set[str] = set()
        self.received: set[str] = set()  # stored names that arrived (a misshaped one too)
        self.stored_names = {f"{name}.{key}": name for name in self.layers for key in QUANT_KEYS}

    def accepts(self, name: str) -> bool:
        """Whether the stored tensor ``name`` belongs to a quantized layer."""
        return name in self.targets if self.targets is not None else name in self.stored_names

    def _staging(self, layer_name: str) -> _Staged:
        staged = self._staged.get(layer_name)
        if staged is None:
            layer = self.layers[layer_name]
            shapes = formats.stored_shapes(layer.mode, layer.out_features, layer.in_features)
            staged = self._staged[layer_name] = _Staged(*(torch.empty(s, dtype=d) for s, d in shapes.values()))
        return staged

    def destination(self, name: str) -> torch.Tensor | None:
        """The CPU memory a quantized folder's tensor ``name`` is read into (None for other names)."""
        if self.targets is not None or name not in self.stored_names:
            return None
        return getattr(self._staging(self.stored_names[name]), name.rsplit(".", 1)[1])

    def take(self, name: str, tensor: torch.Tensor | RowBlocks) -> str | None:
        """Store the tensor ``name`` (an :meth:`accepts` name; source weights may come as :class:`RowBlocks`);
        returns a description of a shape mismatch, if any.

        A layer whose rows are all in is installed at once (:meth:`_install`).
        """
        self.received.add(name)
        if self.targets is not None:
            target = self.targets[name]
            layer = target.module
            want = (target.stop - target.start, layer.in_features)
            if tuple(tensor.shape) != want:
                return f"{name}: checkpoint {list(tensor.shape)} vs model {list(want)}"
            if not tensor.dtype.is_floating_point:
                return f"{name}: checkpoint {tensor.dtype} vs model floating point (the weights to quantize)"
            staged = self._staging(target.module_name)
            blocks = tensor if isinstance(tensor, RowBlocks) else RowBlocks.of(tensor)
            for first, block in blocks:
                rows = slice(target.start + first, target.start + first + block.shape[0])
                formats.quantize_into(block, layer.mode, staged.qweight[rows], staged.qscale[rows])
            staged.rows += target.stop - target.start
            done = staged.rows == layer.out_features
            layer_name = target.module_name
        else:
            layer_name, key = self.stored_names[name], name.rsplit(".", 1)[1]
            staged = self._staging(layer_name)
            slot = getattr(staged, key)
            if tuple(tensor.shape) != tuple(slot.shape):
                return f"{name}: checkpoint {list(tensor.shape)} vs model {list(slot.shape)}"
            if tensor is not slot:  # pickles, which cannot be read into given memory
                slot.copy_(tensor)
            staged.keys.add(key)
            done = len(staged.keys) == len(QUANT_KEYS)
        if done:
            self._install(layer_name)
        return None

    def _install(self, layer_name: str) -> None:
        staged = self._staged.pop(layer_name)
        layer: QuantWeights = self.layers[layer_name]
        dtype = self.dtype_of(layer_name)
        layer.set_weight(staged.qweight.to(self.device), staged.qscale.to(self.device, dtype), "plain", None)
        if self.prepare:
            layer.prepare(dtype, fallback=self.fallback)
        self.installed.add(layer_name)

    def missing(self) -> list[str]:
        """Stored tensors that never arrived (source weights or quantized-folder tensors)."""
        names = self.targets if self.targets is not None else self.stored_names
        return [n for n in names if n not in self.received]
