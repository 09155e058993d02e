"""The quantized linear layer, the quantized token embedding, and which layers of a Janus network are quantized.

Quantized: every linear layer of the language model's decoder layers, with each layer's q/k/v and gate/up
joined into one :class:`QuantLinear` (``self_attn.qkv_proj``, ``mlp.gate_up_proj``; the original names become
:class:`QuantPart` placeholders whose ``weight`` is their rows, so :mod:`janus_core.llm` finds them where it
always did), the image-token head's two layers (Janus / Janus-Pro), and optionally ``lm_head`` (text answers)
and the text-token embedding table (:class:`QuantEmbedding`: one row per token, stored like a linear weight and
dequantized row by row as tokens are looked up; 0.84 GB of Janus-Pro-7B in bf16). Everything else stays in the
compute dtype: the image-token embedding, norms, SigLIP, the VQ model, the aligners and JanusFlow's UViT
encoder / decoder.

The quantized tensors are ``nn.Parameter`` s (integer ones never need gradients), so ``state_dict``, ``.to()``
and ComfyUI's model patcher (which sizes a model from its state dict and moves it module by module) count
and move them like any other weight. The one exception is the oneDNN int8 layout (:mod:`.onednn_int8`): its
prepacked weight is opaque, kept as the plain attribute ``packed``, and ``qweight`` is a stand-in of the right
shape and dtype holding no memory (as :mod:`janus_core.cpu_packed` does for bf16), so sizes stay right;
:meth:`QuantWeights.unpack` restores the values before the weights move to another device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import trim_heap
from ..cpu_packed import stand_in
from ..errors import CheckpointError
from ..llm import PACKED_GROUPS
from . import built_kernels, formats, onednn_int8
from .kernels import BUILT_LAYOUTS, ONEDNN_INT8, PLAIN, Kernel, QuantizedWeight, WeightRows, kernel_for, matmul, pack

# The joined layer that replaces each PACKED_GROUPS group, by the group's parent module.
JOINED_NAMES = {"self_attn": "qkv_proj", "mlp": "gate_up_proj"}
SINGLE_LAYERS = ("self_attn.o_proj", "mlp.down_proj")
GEN_HEAD_LAYERS = ("gen_head.output_mlp_projector", "gen_head.vision_head")
LM_HEAD = "language_model.lm_head"
EMBEDDINGS = "language_model.model.embed_tokens"
UVIT = ("vision_gen_enc_model", "vision_gen_dec_model", "vision_gen_enc_aligner", "vision_gen_dec_aligner")
KEPT = ("the image-token embedding, norms, SigLIP, the VQ model, the aligners and JanusFlow's UViT encoder / decoder "
        "stay in the compute dtype")


class QuantWeights(nn.Module):
    """A weight-only quantized ``[out_features, in_features]`` matrix: parameters ``qweight`` / ``qscale`` (see
    :mod:`janus_core.quant.formats`; canonical layout unless a kernel's layout was installed), what
    :class:`QuantLinear` and :class:`QuantEmbedding` share and the loaders fill."""

    def __init__(self, in_features: int, out_features: int, mode: str):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, formats.check_mode(mode)
        self.group = formats.group_size(mode, in_features)
        shapes = formats.stored_shapes(mode, out_features, in_features)
        self.qweight = nn.Parameter(torch.empty(shapes["qweight"][0], dtype=shapes["qweight"][1]), requires_grad=False)
        self.qscale = nn.Parameter(torch.empty(shapes["qscale"][0], dtype=shapes["qscale"][1]), requires_grad=False)
        self.layout = PLAIN
        self.kernel: Kernel | None = None
        self.packed: onednn_int8.PackedInt8 | None = None  # the oneDNN int8 layout's weight (qweight: a stand-in)

    @property
    def weight(self) -> QuantizedWeight:
        qweight = self.packed if self.packed is not None else self.qweight
        return QuantizedWeight(qweight, self.qscale, self.mode, self.layout, self.kernel, self.group,
                               (self.out_features, self.in_features))

    def set_weight(self, qweight: torch.Tensor | onednn_int8.PackedInt8, qscale: torch.Tensor, layout: str,
                   kernel: Kernel | None) -> None:
        """Install tensors of ``layout`` (made by :func:`janus_core.quant.kernels.pack`) and the kernel reading them."""
        self.packed = qweight if layout == ONEDNN_INT8 else None
        if self.packed is not None:
            qweight = stand_in((self.out_features, self.in_features), torch.int8)
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.qscale = nn.Parameter(qscale, requires_grad=False)
        self.layout, self.kernel = layout, kernel

    def unpack(self, device: torch.device | None = None) -> None:
        """Back to the canonical layout if the weight is in the oneDNN int8 one (then on ``device``, default the
        CPU) or a built kernel's (where its tensors are): before the parameters move to another device, or are
        read. A no-op otherwise."""
        if self.packed is not None:
            qweight = onednn_int8.unpack(self.packed)
            self.set_weight(qweight if device is None else qweight.to(device), self.qscale.data, PLAIN, None)
        elif self.layout in BUILT_LAYOUTS:
            self.set_weight(*built_kernels.unpack(self.qweight.data, self.qscale.data, self.mode), PLAIN, None)

    def prepare(self, dtype: torch.dtype, *, fallback: bool = True) -> None:
        """Make the weights ready to compute in ``dtype`` on the device they are on (here: the scales' dtype)."""
        if self.qscale.dtype != dtype:
            self.qscale.data = self.qscale.data.to(dtype)


class QuantLinear(QuantWeights):
    """Weight-only quantized ``nn.Linear(in_features, out_features)`` with an optional float ``bias``. ``parts``
    are the row counts of the projections a joined layer holds."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, parts: tuple[int, ...] = ()):
        super().__init__(in_features, out_features, mode)
        self.parts = parts or (out_features,)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]`` in ``x``'s dtype (which should be the scales' dtype)."""
        y = matmul(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def prepare(self, dtype: torch.dtype, *, fallback: bool = True) -> None:
        """Choose the kernel for the device the weights are on (self-checked once per device, mode and dtype)
        and lay the weights out for it; cheap when they already are. Raises when they were laid out for another
        device's kernel (a device-specific int4 packing cannot be read back)."""
        device = self.qweight.device
        choice = kernel_for(device, self.mode, dtype, fallback=fallback)
        fits = choice.kernel is not None and choice.kernel.fits(self.out_features, self.in_features)
        target = choice.layout if fits else PLAIN
        kernel = choice.kernel if fits else None
        if self.layout == target:
            super().prepare(dtype)
            self.kernel = kernel
            return
        self.unpack(device)  # parameters moved without unpack() first: the values are still in the packed copy
        if self.layout != PLAIN:
            raise CheckpointError(
                f"These int4 weights were packed for the {self.layout} kernel and cannot run on {device}: load "
                f"the model with device='{device}' (or load_model(compute_device='{device}')) instead of moving it."
            )
        self.set_weight(*pack(self.qweight.data, self.qscale.data, self.mode, target, dtype), target, kernel)
        if device.type == "cpu" and target != PLAIN:
            trim_heap()  # the canonical copy just freed: without this a 7B int8 load peaks 1 GB higher


class QuantEmbedding(QuantWeights):
    """Weight-only quantized ``nn.Embedding(num_embeddings, embedding_dim)``: the table is an
    ``[num_embeddings, embedding_dim]`` matrix in the canonical layout (int8: one scale per token; int4: groups
    along the embedding), always kept there; a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str):
        super().__init__(embedding_dim, num_embeddings, mode)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[...]`` -> embeddings ``[..., embedding_dim]`` in the scales' (compute) dtype."""
        flat = ids.reshape(-1)
        rows = formats.dequantize(self.qweight.index_select(0, flat), self.qscale.index_select(0, flat), self.mode,
                                  self.qscale.dtype)
        return rows.view(*ids.shape, self.in_features)


class QuantPart(nn.Module):
    """Placeholder for one projection inside a joined :class:`QuantLinear` (rows ``start:stop``): no weights of
    its own; ``weight`` is its rows of the joined weight, which :func:`janus_core.llm.joined_weight` re-joins."""

    def __init__(self, joined: QuantLinear, start: int, stop: int):
        super().__init__()
        object.__setattr__(self, "joined", joined)  # a plain reference: the joined layer is registered once
        self.start, self.stop = start, stop
        self.in_features, self.out_features = joined.in_features, stop - start

    @property
    def weight(self) -> WeightRows:
        return self.joined.weight.rows(self.start, self.stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.joined(x)[..., self.start:self.stop]


@dataclass(frozen=True)
class Target:
    """Where a full-precision source weight goes when quantized while loading: rows ``start:stop`` of
    ``module`` (the quantized layer named ``module_name``)."""

    module_name: str
    module: QuantWeights
    start: int
    stop: int


def standard_modules(net: nn.Module, lm_head: bool, embeddings: bool) -> list[str]:
    """Names of the layers :func:`quantize_modules` quantizes by default (joined names for q/k/v and gate/up),
    ``lm_head`` and the text-token embedding table as asked."""
    names = [EMBEDDINGS] if embeddings else []
    for i in range(len(net.language_model.model.layers)):
        prefix = f"language_model.model.layers.{i}."
        names += [prefix + f"{parent}.{joined}" for parent, joined in JOINED_NAMES.items()]
        names += [prefix + name for name in SINGLE_LAYERS]
    if lm_head:
        names.append(LM_HEAD)
    if hasattr(net, "gen_head"):
        names += list(GEN_HEAD_LAYERS)
    return names


def check_modules(net: nn.Module, names: list[str], where: str) -> None:
    """Refuse any name in ``names`` that is not a quantizable layer of ``net`` (``where`` names the source)."""
    allowed = set(standard_modules(net, lm_head=True, embeddings=True))
    for name in names:
        if name in allowed:
            continue
        if name.split(".", 1)[0] in UVIT:
            what = "JanusFlow's UViT, which is never quantized (it runs in the compute dtype)"
        else:
            what = "not one of the layers that can be quantized"
        raise CheckpointError(
            f"{where} asks to quantize '{name}': {what}. Only the language model's linear layers, lm_head, the "
            f"text-token embedding and the image-token head are quantized; {KEPT}. Re-create the quantized folder with "
            "janus_core.quant.folder.save_quantized (python -m janus_core quantize)."
        )


def quantize_modules(net: nn.Module, mode: str, names: list[str]) -> dict[str, Target]:
    """Replace the layers ``names`` of the (meta-device) ``net`` by empty quantized layers.

    Returns, for every full-precision weight those layers had (``<layer>.weight``; q/k/v and gate/up each under
    their own name), where its quantized rows go. Biases keep their names. The embedding table
    (:data:`EMBEDDINGS`) becomes a :class:`QuantEmbedding`.
    """
    targets: dict[str, Target] = {}
    groups = {}
    for group in PACKED_GROUPS:
        parent = group[0].split(".")[0]
        groups[JOINED_NAMES[parent]] = group
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        if name == EMBEDDINGS:
            table = net.get_submodule(name)
            layer = QuantEmbedding(table.num_embeddings, table.embedding_dim, mode)
            net.get_submodule(parent_name).add_module(leaf, layer)
            targets[f"{name}.weight"] = Target(name, layer, 0, table.num_embeddings)
            continue
        members = [f"{parent_name.rsplit('.', 1)[0]}.{m}" for m in groups[leaf]] if leaf in groups else [name]
        originals = [net.get_submodule(m) for m in members]
        parts = tuple(o.out_features for o in originals)
        layer = QuantLinear(originals[0].in_features, sum(parts), originals[0].bias is not None, mode, parts)
        net.get_submodule(parent_name).add_module(leaf, layer)
        start = 0
        for member, count in zip(members, parts, strict=True):
            targets[f"{member}.weight"] = Target(name, layer, start, start + count)
            if leaf in groups:
                owner, _, member_leaf = member.rpartition(".")
                net.get_submodule(owner).add_module(member_leaf, QuantPart(layer, start, start + count))
            start += count
    return targets


def quant_layers(net: nn.Module) -> dict[str, QuantWeights]:
    """Every quantized layer (:class:`QuantLinear`, :class:`QuantEmbedding`) of ``net`` by name."""
    return {name: m for name, m in net.named_modules() if isinstance(m, QuantWeights)}


def quantized_mode(net: nn.Module) -> str | None:
    """``"int8"`` / ``"int4"`` when ``net`` holds quantized layers, else None."""
    return next((m.mode for m in net.modules() if isinstance(m, QuantWeights)), None)
