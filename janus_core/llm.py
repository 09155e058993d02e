"""Forward pass of the Llama language model with a preallocated KV cache.

The weights live in transformers' ``LlamaForCausalLM`` (so the state-dict keys are the original ones);
the forward pass is ours. That keeps the hot loops independent of transformers' cache API (which changed
several times since the checkpoints were released) and lets the KV cache be written in place instead of
growing by concatenation. Numerics follow transformers' Llama: RMSNorm in float32, rotate-half RoPE with
float32 angles, SiLU-gated MLP, softmax attention with scale ``head_dim**-0.5``.

Speed (docs/PERFORMANCE.md): a decode step is bound by reading the weights, so the runner

* computes each matmul in the form the device streams fastest: on CPUs where oneDNN packs bf16 weights, the
  decoder layers' matrices are packed once (:mod:`janus_core.cpu_packed`, :func:`cpu_pack_layers`); otherwise
  :func:`janus_core.precision.matmul_form` picks the operand order by CPU class, dtype and row count, and on
  CPUs without bf16 instructions converts bf16 weights to float32 in cache-sized chunks when more than a few
  rows share them;
* keeps the number of small ops per layer low: RMSNorm in 3 ops, RoPE from precomputed cos / signed-sin
  tables, in-place residual and SwiGLU updates, no attention mask unless padding needs one;
* optionally runs one-token steps through ``torch.compile`` (``compile=True`` or ``JANUS_COMPILE=1``;
  CUDA graphs on CUDA) with a fixed-shape step, so one compilation serves every position.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_packed, precision
from .config import LlamaSpec
from .errors import JanusError
from .quant.kernels import join as join_quantized
from .quant.kernels import matmul as quantized_matmul

logger = logging.getLogger(__name__)

COMPILE_ENV = "JANUS_COMPILE"
# Devices whose scaled_dot_product_attention kernels never materialise the attention scores (memory estimates).
FUSED_ATTENTION_DEVICES = ("cpu", "cuda")


class Scratch:
    """Work buffers reused by every forward over one :class:`KVCache` (the shapes repeat from step to step).

    A JanusFlow step moves ~100 MB of activations per layer; fresh allocations of that size are new memory
    mappings that page-fault on first write (more time than the elementwise work itself on a CPU). Buffers
    live as long as their cache, i.e. one generation.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
            ) -> torch.Tensor:
        """An uninitialised ``shape`` buffer named ``name`` on ``like``'s device (``dtype`` default: ``like``'s)."""
        dtype = dtype or like.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return buf


def _empty(scratch: Scratch | None, name: str, shape: tuple[int, ...], like: torch.Tensor,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scratch``'s buffer ``name``, or a fresh tensor when there is no scratch (compiled, functional code)."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return scratch.get(name, shape, like, dtype)


def work_buffer_bytes(spec: LlamaSpec, rows: int, tokens: int, dtype: torch.dtype, device_type: str = "cpu",
                      cpu_class: str | None = None) -> int:
    """Bytes of the :class:`Scratch` buffers (plus the attention output) of one forward over ``tokens`` new
    positions of ``rows`` rows in ``dtype`` on ``device_type``, with packed projections.

    Per token: residual, two normed / projected hidden vectors, joined q/k/v, q and k after RoPE with their
    swap buffers, attention output (kernel result and re-laid copy), gate/up; plus RMSNorm's float32 copy; and
    when the matmuls take the float32-chunks form (:func:`janus_core.precision.matmul_form`, ``cpu_class``
    default this machine's) their float32 inputs and outputs and the weight chunk.
    """
    d = spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    hidden, inter = spec.hidden_size, spec.intermediate_size
    elements = 3 * hidden + (q + 2 * kv) + 2 * q + 2 * kv + 2 * q + 2 * inter
    norm_f32 = 0 if dtype == torch.float32 else 4 * hidden
    n = rows * tokens
    total = n * (elements * dtype.itemsize + norm_f32)
    form = precision.matmul_form(dtype, n, device_type, precision.cpu_class_for(device_type, cpu_class))
    if form == precision.FP32_CHUNKS:
        inputs, outputs = hidden + inter, (q + 2 * kv) + hidden + 2 * inter
        total += 4 * (n * (inputs + outputs) + max(precision.FP32_CHUNK_ELEMENTS, hidden, inter))
    return total


def forward_bytes(spec: LlamaSpec, rows: int, tokens: int, context: int, dtype: torch.dtype,
                  device: torch.device) -> int:
    """Peak bytes one :meth:`LlamaRunner.forward` of ``tokens`` new positions attending ``context`` positions
    allocates besides its :class:`KVCache`: the work buffers (:func:`work_buffer_bytes`), one layer's attention
    temporaries and the final-norm output ``[rows, tokens, hidden]``.

    Attention temporaries: k / v repeated to every head when the model has fewer key/value heads (GQA), and for
    a multi-token block the boolean masks and their conversion to ``dtype`` ``[rows, 1, tokens, context]``.
    Off the CPU and CUDA (whose fused kernels never hold them) the ``[rows, heads, tokens, context]`` float32
    scores and probabilities count too: MPS and torch's math fallback materialise them.
    """
    size = dtype.itemsize
    heads, d = spec.num_attention_heads, spec.head_dim
    attention = 0
    if spec.num_key_value_heads != heads:
        attention += 2 * rows * heads * context * d * size
    if tokens > 1:
        attention += rows * tokens * context * (2 + size) + 2 * tokens * context
    if device.type not in FUSED_ATTENTION_DEVICES:
        attention += 2 * rows * heads * tokens * context * 4
    final_norm = rows * tokens * spec.hidden_size * (size + (0 if dtype == torch.float32 else 4))
    return work_buffer_bytes(spec, rows, tokens, dtype) + attention + final_norm


def kv_cache_bytes(spec: LlamaSpec, rows: int, positions: int, dtype: torch.dtype) -> int:
    """Bytes of a :class:`KVCache` for ``rows`` sequences of ``positions`` tokens in ``dtype``: keys and values of
    every layer, plus the boolean validity mask."""
    per_position = 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * dtype.itemsize + 1
    return rows * positions * per_position


@dataclass
class KVCache:
    """Per-layer keys and values, preallocated: ``keys[i]`` / ``values[i]`` are ``[B, kv_heads, max_len, head_dim]``.

    ``length`` is the number of positions written so far; ``valid`` (optional, bool ``[B, max_len]``)
    marks positions that may be attended (False for left padding or a masked-out prompt part). ``scratch``
    holds the forward passes' work buffers.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    valid: torch.Tensor | None = None
    scratch: Scratch = field(default_factory=Scratch, repr=False)

    @classmethod
    def allocate(cls, runner: LlamaRunner, batch: int, max_len: int, *, with_mask: bool = False) -> KVCache:
        """Empty cache for ``runner``'s model with room for ``max_len`` positions of ``batch`` rows.

        Zero-filled when the runner compiles its decode step (that step attends over the whole capacity under a
        mask, and unwritten garbage could be NaN); uninitialised otherwise.
        """
        ref = runner.lm.model.embed_tokens.weight
        shape = (batch, runner.n_kv, max_len, runner.head_dim)
        new = torch.zeros if runner.compile else torch.empty
        n = runner.n_layers
        keys = [new(shape, dtype=ref.dtype, device=ref.device) for _ in range(n)]
        values = [new(shape, dtype=ref.dtype, device=ref.device) for _ in range(n)]
        valid = torch.zeros(batch, max_len, dtype=torch.bool, device=ref.device) if with_mask else None
        return cls(keys, values, 0, valid)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def copy_prefix_into(self, other: KVCache, rows: slice | torch.Tensor,
                         source_rows: slice | torch.Tensor | None = None) -> None:
        """Copy this cache's ``length`` positions (rows ``source_rows``, default all) into ``other[rows]``.

        Used to prefill a shared prompt once and hand it to every row of a larger batch.
        """
        n = self.length
        src_rows = slice(None) if source_rows is None else source_rows
        for src, dst in zip(self.keys + self.values, other.keys + other.values, strict=True):
            dst[rows, :, :n] = src[src_rows, :, :n]
        if other.valid is not None:
            other.valid[rows, :n] = True if self.valid is None else self.valid[src_rows, :n]
        other.length = max(other.length, n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scratch: Scratch | None = None,
             name: str = "norm") -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.

    The float32 statistics come from one reduction over a float32 copy of ``x``; the normalised value is
    rounded once, straight into a tensor of ``x``'s dtype (bit-identical to the textbook formula). With a
    ``scratch`` the float32 copy and the result are its buffers (``name``).
    """
    if x.dtype == torch.float32:
        x32 = x
    else:
        x32 = _empty(scratch, "norm_f32", tuple(x.shape), x, torch.float32)
        x32.copy_(x)
    inv = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)
    inv = inv.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return torch.mul(x32, inv, out=_empty(scratch, name, tuple(x.shape), x)).mul_(weight)


def linear(x: torch.Tensor, weight: torch.Tensor, scratch: Scratch | None = None, name: str = "linear",
           cpu_class: str | None = None) -> torch.Tensor:
    """``x [..., K]`` times ``weight [N, K]`` transposed -> ``[..., N]`` in ``x``'s dtype (no bias); into
    ``scratch[name]`` if given. ``x`` and ``weight`` share a dtype, or ``weight`` is packed for oneDNN
    (:mod:`janus_core.cpu_packed`) or weight-only quantized (:func:`janus_core.quant.kernels.matmul`); those
    pick their own kernel and output.

    The form comes from :func:`janus_core.precision.matmul_form` for ``cpu_class`` (default: this machine's).
    The ``weight @ x.T`` forms return a transposed (non-contiguous) result: making it contiguous costs more
    than the consumers' strided reads.
    """
    rows = x.numel() // x.shape[-1]
    n = weight.shape[0]
    x2d = x.reshape(rows, x.shape[-1])
    if isinstance(weight, cpu_packed.PackedWeight):
        return cpu_packed.matmul(x2d, weight).view(*x.shape[:-1], n)
    if not isinstance(weight, torch.Tensor):  # a weight-only quantized weight (janus_core.quant)
        return quantized_matmul(x2d, weight, cpu_class).view(*x.shape[:-1], n)
    device = weight.device.type
    form = precision.matmul_form(weight.dtype, rows, device, precision.cpu_class_for(device, cpu_class))
    if form == precision.W_XT:
        out = torch.mm(weight, x2d.t(), out=_empty(scratch, name, (n, rows), x)).t()
    elif form == precision.FP32_CHUNKS:
        out = _fp32_chunks(x2d, weight, scratch, name).t()
    else:
        out = torch.mm(x2d, weight.t(), out=_empty(scratch, name, (rows, n), x))
    return out.view(*x.shape[:-1], n)


def _fp32_chunks(x2d: torch.Tensor, weight: torch.Tensor, scratch: Scratch | None, name: str) -> torch.Tensor:
    """``weight @ x2d.T`` ``[N, rows]`` in ``x2d``'s dtype, computed in float32: the weight is converted
    :data:`janus_core.precision.FP32_CHUNK_ELEMENTS` at a time into a reused buffer (for CPUs whose bf16 matmuls
    are emulated)."""
    n, k = weight.shape
    x32 = _empty(scratch, f"x_f32_{k}", tuple(x2d.shape), x2d, torch.float32).copy_(x2d)
    out32 = _empty(scratch, f"{name}_f32", (n, x2d.shape[0]), x2d, torch.float32)
    step = max(1, precision.FP32_CHUNK_ELEMENTS // k)
    buf = _empty(scratch, "w_f32", (max(precision.FP32_CHUNK_ELEMENTS, k),), x2d, torch.float32)
    for i in range(0, n, step):
        m = min(step, n - i)
        w32 = buf[: m * k].view(m, k).copy_(weight[i:i + m])
        torch.mm(w32, x32.t(), out=out32[i:i + m])
    return _empty(scratch, name, (n, x2d.shape[0]), x2d).copy_(out32)


class RotaryTable:
    """cos / signed-sin tables ``[max_pos, head_dim]`` (float32 angles, stored in the model dtype).

    ``sin`` has its first half negated, so rotate-half RoPE is ``x * cos + swap_halves(x) * sin``
    (bit-identical to ``x * cos + cat(-x2, x1) * sin``).
    """

    def __init__(self, head_dim: int, theta: float, max_pos: int, dtype: torch.dtype, device: torch.device):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        pos = torch.arange(max_pos, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        self.cos = torch.cat([freqs, freqs], dim=-1).cos().to(dtype)
        self.sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(dtype)

    @property
    def size(self) -> int:
        return self.cos.shape[0]

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` or ``[B, T]`` -> cos, sin broadcastable to ``[B, T, heads, head_dim]``."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            return cos[None, :, None], sin[None, :, None]
        return cos[:, :, None], sin[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scratch: Scratch | None = None,
               name: str = "rope") -> torch.Tensor:
    """Rotate-half RoPE of ``x [B, T, heads, head_dim]`` (any strides) with :class:`RotaryTable` tables.

    Returns a contiguous tensor (the attention kernels want a unit-stride last dim); ``scratch[name]`` if given.
    """
    half = x.shape[-1] // 2
    out = torch.mul(x, cos, out=_empty(scratch, name, tuple(x.shape), x))
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1,
                        out=_empty(scratch, f"{name}_swap", tuple(x.shape), x))
    return out.add_(swapped.mul_(sin))


# Projections of one decoder layer that read the same input; :func:`pack_projections` stores each group back to
# back in one buffer so a decode step streams them with one matmul instead of three (two).
PACKED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def joined_weight(parts: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """``[sum(out_i), in]`` view over ``parts`` (``[out_i, in]`` matrices) if they lie back to back in one buffer.

    No copy: the result shares their memory. None when they do not (e.g. after a device move re-allocated each
    parameter), in which case callers run one matmul per part.
    """
    first = parts[0]
    if not isinstance(first, torch.Tensor):  # rows of a joined quantized layer (janus_core.quant)
        return join_quantized(parts)
    offset = first.storage_offset()
    base = first.untyped_storage().data_ptr()
    for p in parts:
        if (p.dim() != 2 or p.shape[1] != first.shape[1] or p.dtype != first.dtype or not p.is_contiguous()
                or p.storage_offset() != offset or p.untyped_storage().data_ptr() != base):
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def _group_slices(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Views ``[out_i, in]`` of one new uninitialised ``[sum(out_i), in]`` buffer, back to back."""
    buffer = torch.empty(sum(s[0] for s in shapes), shapes[0][1], dtype=dtype, device=device)
    return list(buffer.split([s[0] for s in shapes]))


def pack_projections(lm: nn.Module) -> int:
    """Store each layer's q/k/v and gate/up weights back to back in one buffer (parameters become views).

    Layer by layer, so memory grows by one group at most. State-dict keys, shapes and values are unchanged.
    Groups already packed are left alone. Returns the number of groups packed now. A device move (``.to``)
    re-allocates every parameter on its own; call this again afterwards to get the fused matmuls back.
    """
    packed = 0
    with torch.no_grad():
        for layer in lm.model.layers:
            for group in PACKED_GROUPS:
                modules = [layer.get_submodule(name) for name in group]
                weights = tuple(m.weight for m in modules)
                if joined_weight(weights) is not None or any(w.is_meta for w in weights):
                    continue
                slices = _group_slices([tuple(w.shape) for w in weights], weights[0].dtype, weights[0].device)
                for m, w, part in zip(modules, weights, slices, strict=True):
                    m.weight = nn.Parameter(part.copy_(w), requires_grad=w.requires_grad)
                packed += 1
    return packed


# Attribute of a decoder layer packed by cpu_pack_layers: {"qkv" | "o" | "gate_up" | "down": PackedWeight}. A plain
# attribute, so state_dict and .to() never see the opaque tensors.
CPU_PACKED_ATTR = "_janus_cpu_packed"
# Which modules each packed matrix stands for (joined matrices: their rows in this order).
CPU_PACKED_MATRICES = (("qkv", PACKED_GROUPS[0]), ("o", ("self_attn.o_proj",)), ("gate_up", PACKED_GROUPS[1]),
                       ("down", ("mlp.down_proj",)))


def cpu_pack_layers(lm: nn.Module) -> int:
    """Pack each decoder layer's matrices for oneDNN (:mod:`janus_core.cpu_packed`) where its weights are
    plain, joined (:func:`pack_projections`) and on the CPU in a dtype :func:`~janus_core.cpu_packed.can_pack`
    accepts; the parameters become stand-ins. Layer by layer, so RAM grows by one layer at most. Returns the
    number of layers packed now (layers already packed, quantized or elsewhere are left alone).
    """
    layers = lm.model.layers
    first = layers[0].self_attn.o_proj.weight if len(layers) else None
    if not (isinstance(first, torch.Tensor) and first.device.type == "cpu" and cpu_packed.can_pack(first.dtype)):
        return 0  # quantized, float32 or off the CPU: nothing to pack (checked once, not per layer)
    count = 0
    with torch.no_grad():
        for layer in layers:
            if CPU_PACKED_ATTR in layer.__dict__:
                continue
            w = LayerWeights.of(layer)
            if not (isinstance(w.qkv, torch.Tensor) and isinstance(w.gate_up, torch.Tensor)):
                continue  # not joined (pack_projections packs them first)
            packed = {key: cpu_packed.pack(getattr(w, key)) for key, _ in CPU_PACKED_MATRICES}
            for _, names in CPU_PACKED_MATRICES:
                for name in names:
                    module = layer.get_submodule(name)
                    module.weight = nn.Parameter(cpu_packed.stand_in(tuple(module.weight.shape), module.weight.dtype),
                                                 requires_grad=False)
            setattr(layer, CPU_PACKED_ATTR, packed)
            count += 1
    return count


def cpu_unpack_layers(lm: nn.Module) -> int:
    """Undo :func:`cpu_pack_layers`: plain parameters (q/k/v and gate/up joined again) instead of stand-ins, layer by
    layer. Needed before the weights are moved, read or saved. Returns the number of layers unpacked."""
    count = 0
    with torch.no_grad():
        for layer in lm.model.layers:
            packed = layer.__dict__.pop(CPU_PACKED_ATTR, None)
            if packed is None:
                continue
            for key, names in CPU_PACKED_MATRICES:
                modules = [layer.get_submodule(name) for name in names]
                parts = packed[key].dense().split([m.weight.shape[0] for m in modules])
                for module, part in zip(modules, parts, strict=True):
                    module.weight = nn.Parameter(part, requires_grad=False)
            count += 1
    return count


def packed_slots(lm: nn.Module, prefix: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Empty joined buffers for every :data:`PACKED_GROUPS` group of ``lm`` (meta-device modules are fine).

    Returns state-dict name (``prefix`` + ``model.layers.<i>.<proj>.weight``) -> the slice of its group's
    buffer that parameter's values belong in; a loader fills the slices and assigns them as the parameters.
    Unwritten buffer pages cost no RAM, so allocating every group up front does not raise the load peak.
    """
    slots: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(lm.model.layers):
        for group in PACKED_GROUPS:
            shapes = [tuple(layer.get_submodule(name).weight.shape) for name in group]
            for name, part in zip(group, _group_slices(shapes, dtype, device), strict=True):
                slots[f"{prefix}model.layers.{i}.{name}.weight"] = part
    return slots


class LayerWeights(NamedTuple):
    """The weights of one transformers ``LlamaDecoderLayer`` (``[out, in]`` matrices, norm scales).

    ``qkv`` / ``gate_up`` are the joined ``[q; k; v]`` and ``[gate; up]`` matrices when the layer was packed
    (:func:`pack_projections`), else None.
    """

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    qkv: torch.Tensor | None
    gate_up: torch.Tensor | None

    @classmethod
    def of(cls, layer: nn.Module) -> LayerWeights:
        """The layer's weights; for a layer packed by :func:`cpu_pack_layers` the matrices are its
        :class:`~janus_core.cpu_packed.PackedWeight` s (q / k / v / gate / up: stand-ins giving the shapes)."""
        a, m = layer.self_attn, layer.mlp
        q, k, v, gate, up = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight, m.up_proj.weight
        norms = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        packed = layer.__dict__.get(CPU_PACKED_ATTR)
        if packed is not None:
            if q.device.type != "cpu":
                raise JanusError(
                    f"The language model's weights were packed for the CPU and then moved to {q.device} without "
                    "being unpacked, so they are lost. Move the model with JanusModel.to(), not net.to(), and "
                    "load it again."
                )
            return cls(norms[0], q, k, v, packed["o"], norms[1], gate, up, packed["down"], packed["qkv"],
                       packed["gate_up"])
        if isinstance(q, torch.Tensor) and cpu_packed.is_stand_in(q):
            raise JanusError("internal: a decoder layer holds stand-ins for packed weights but no packed weights")
        return cls(norms[0], q, k, v, a.o_proj.weight, norms[1], gate, up, m.down_proj.weight,
                   joined_weight((q, k, v)), joined_weight((gate, up)))


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_layer(x: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  head_dim: int, attend: Attend, scratch: Scratch | None = None, cpu_class: str | None = None
                  ) -> torch.Tensor:
    """One Llama layer on ``x [B, T, hidden]``, updating ``x`` in place (and returning it).

    ``attend(q, k, v)`` gets ``[B, heads | kv_heads, T, head_dim]`` tensors, stores k / v in the cache and
    returns the attention output ``[B, heads, T, head_dim]``. Intermediate results go to ``scratch``'s buffers
    when one is given (they are dead once the layer returns). ``cpu_class``: see :func:`linear`.
    """

    def proj(a: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
        return linear(a, weight, scratch, name, cpu_class)

    bsz, t, _ = x.shape
    h = rms_norm(x, w.input_norm, eps, scratch, "h")
    if w.qkv is not None:
        qkv = proj(h, w.qkv, "qkv").view(bsz, t, -1, head_dim)
        n_q, n_k = w.q.shape[0] // head_dim, w.k.shape[0] // head_dim
        q, k, v = qkv[:, :, :n_q], qkv[:, :, n_q:n_q + n_k], qkv[:, :, n_q + n_k:]
    else:
        q = proj(h, w.q, "q").view(bsz, t, -1, head_dim)
        k = proj(h, w.k, "k").view(bsz, t, -1, head_dim)
        v = proj(h, w.v, "v").view(bsz, t, -1, head_dim)
    q, k = apply_rope(q, cos, sin, scratch, "q_rope"), apply_rope(k, cos, sin, scratch, "k_rope")
    o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)  # [B, T, heads, D]
    if not o.is_contiguous():
        o = _empty(scratch, "attn", tuple(o.shape), o).copy_(o)
    x.add_(proj(o.view(bsz, t, -1), w.o, "proj"))
    h = rms_norm(x, w.post_norm, eps, scratch, "h")
    if w.gate_up is not None:
        gate_up = proj(h, w.gate_up, "gate_up")
        inter = w.gate.shape[0]
        gate, up = gate_up[..., :inter], gate_up[..., inter:]
    else:
        gate, up = proj(h, w.gate, "gate"), proj(h, w.up, "up")
    act = F.silu(gate, inplace=True).mul_(up)
    return x.add_(proj(act, w.down, "proj"))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool) -> torch.Tensor:
    """Softmax attention; k / v with fewer heads than q (GQA) are repeated to match."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _attend_rows_fp32(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int,
                      mask: torch.Tensor | None, scratch: Scratch) -> torch.Tensor:
    """:func:`_sdpa` of one-query ``q [B, heads, 1, D]`` over the cache's first ``end`` positions, row by row in
    float32: each row's keys and values are converted into a cache-resident buffer first. On CPUs without AMX
    this streams a bf16 cache ~3x faster than the bf16 attention kernel (docs/PERFORMANCE.md)."""
    bsz, kv_heads, capacity, head_dim = keys.shape
    k32 = scratch.get("k_row_f32", (1, kv_heads, capacity, head_dim), q, torch.float32)[:, :, :end]
    v32 = scratch.get("v_row_f32", (1, kv_heads, capacity, head_dim), q, torch.float32)[:, :, :end]
    q32 = scratch.get("q_f32", tuple(q.shape), q, torch.float32).copy_(q)
    out = scratch.get("attn_rows", tuple(q.shape), q)
    for b in range(bsz):
        row_mask = None if mask is None else mask[b:b + 1] if mask.shape[0] > 1 else mask
        k32.copy_(keys[b:b + 1, :, :end])
        v32.copy_(values[b:b + 1, :, :end])
        out[b:b + 1].copy_(_sdpa(q32[b:b + 1], k32, v32, row_mask, False))
    return out


def _env_compile() -> bool:
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class LlamaRunner:
    """Runs a transformers ``LlamaForCausalLM``'s decoder stack over a :class:`KVCache`.

    ``forward(embeds, cache)`` appends ``T`` positions and returns the final-norm hidden states
    ``[B, T, hidden]``; logits (when wanted) come from :meth:`lm_logits`. ``compile`` (default: the
    ``JANUS_COMPILE`` environment variable) runs one-token steps through ``torch.compile``; if compiling
    fails, the runner logs why and stays eager.
    """

    def __init__(self, lm: nn.Module, spec: LlamaSpec, *, compile: bool | None = None):
        self.lm = lm
        self.n_layers = spec.num_hidden_layers
        self.n_heads = spec.num_attention_heads
        self.n_kv = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.eps = spec.rms_norm_eps
        self.theta = spec.rope_theta
        self.compile = _env_compile() if compile is None else bool(compile)
        self.cpu_class = precision.local_cpu_class()  # resolved here: the compiled step must not probe the CPU
        self._rope: RotaryTable | None = None
        self._step: Callable[..., torch.Tensor] | None = None

    def prepare_weights(self) -> None:
        """Pack the decoder layers for the CPU's matmul where that applies (:func:`cpu_pack_layers`; not while
        compiling, whose traced step reads plain weights). Cheap once done; every forward calls it."""
        if not self.compile:
            packed = cpu_pack_layers(self.lm)
            if packed:
                logger.debug("packed %d decoder layers for oneDNN", packed)

    def rope(self, max_pos: int) -> RotaryTable:
        """RoPE tables covering positions ``[0, max(max_pos, 4096))`` in the model's dtype and device."""
        w = self.lm.model.embed_tokens.weight
        table = self._rope
        if table is None or table.cos.dtype != w.dtype or table.cos.device != w.device or table.size < max_pos:
            table = self._rope = RotaryTable(self.head_dim, self.theta, max(max_pos, 4096), w.dtype, w.device)
        return table

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token ids ``[B, T]`` -> embeddings ``[B, T, hidden]``."""
        return self.lm.model.embed_tokens(ids)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden ``[..., hidden]`` -> text logits ``[..., vocab]``."""
        return linear(hidden, self.lm.lm_head.weight, cpu_class=self.cpu_class)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
                new_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``embeds [B, T, hidden]`` to ``cache`` and return final-norm hidden ``[B, T, hidden]``.

        ``positions`` (``[T]`` or ``[B, T]``, default ``cache.length + arange(T)``; each below
        ``max(cache.capacity, 4096)``) are the RoPE positions. ``new_valid`` (bool ``[B, T]``) marks which new
        positions later tokens may attend; it needs a cache allocated ``with_mask=True``. Attention is causal
        within the new block.
        """
        bsz, t, _ = embeds.shape
        start = cache.length
        end = start + t
        if end > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, {end} needed")
        if cache.batch != bsz:
            raise ValueError(f"KV cache batch {cache.batch} != input batch {bsz}")
        if new_valid is not None and cache.valid is None:
            raise ValueError("new_valid needs a cache allocated with_mask=True")
        if positions is None:
            positions = torch.arange(start, end, device=embeds.device)
        cos, sin = self.rope(cache.capacity)(positions)
        self.prepare_weights()
        weights = [LayerWeights.of(layer) for layer in self.lm.model.layers]
        x = None
        if t == 1 and new_valid is None and self.compile:
            x = self._compiled_step(embeds, weights, cache, cos, sin)
        if x is None:
            mask = self._attention_mask(cache, start, end, new_valid)
            causal = mask is None and t > 1
            form = precision.attention_form(cache.keys[0].dtype, t, embeds.device.type, self.cpu_class)
            x = cache.scratch.get("x", tuple(embeds.shape), embeds).copy_(embeds)
            for i, w in enumerate(weights):
                def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                    keys, values = cache.keys[i], cache.values[i]
                    keys[:, :, start:end] = k
                    values[:, :, start:end] = v
                    if form == precision.FP32_ROWS:
                        return _attend_rows_fp32(q, keys, values, end, mask, cache.scratch)
                    return _sdpa(q, keys[:, :, :end], values[:, :, :end], mask, causal)

                x = decoder_layer(x, w, cos, sin, self.eps, self.head_dim, attend, cache.scratch, self.cpu_class)
        cache.length = end
        return rms_norm(x, self.lm.model.norm.weight, self.eps)

    @staticmethod
    def _attention_mask(cache: KVCache, start: int, end: int, new_valid: torch.Tensor | None
                        ) -> torch.Tensor | None:
        """Boolean ``[B or 1, 1, T, end]`` mask (True = attend), or None when plain causal / full suffices."""
        t = end - start
        device = cache.keys[0].device
        if cache.valid is None:
            if t == 1 or start == 0:
                return None
            return torch.ones(t, end, dtype=torch.bool, device=device).tril(start)[None, None]
        cache.valid[:, start:end] = True if new_valid is None else new_valid
        keys_ok = cache.valid[:, None, None, :end]  # [B, 1, 1, end]
        if t == 1 and new_valid is None:
            return keys_ok
        causal = torch.ones(t, end, dtype=torch.bool, device=device).tril(start)[None, None]
        # A query whose every key is masked (a left-pad position) would give NaN; let it see itself.
        diag = torch.zeros(t, end, dtype=torch.bool, device=device)
        diag[torch.arange(t), torch.arange(start, end)] = True
        return (keys_ok & causal) | diag[None, None]

    def _compiled_step(self, embeds: torch.Tensor, weights: list[LayerWeights], cache: KVCache, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor | None:
        """One-token step through the compiled function (None if compiling failed: the caller runs eagerly).

        Shapes are fixed for a given cache (attention covers the whole capacity under a mask), so one
        compilation serves every position and CUDA graphs can replay it.
        """
        start = cache.length
        device = embeds.device
        written = torch.arange(cache.capacity, device=device) <= start
        if cache.valid is not None:
            cache.valid[:, start] = True
            written = written & cache.valid
        mask = written.view(-1, 1, 1, cache.capacity)
        pos = torch.full((1,), start, dtype=torch.long, device=device)
        if self._step is None:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._step = torch.compile(self._static_step, mode=mode, fullgraph=True)
        try:
            return self._step(embeds, weights, cache.keys, cache.values, cos, sin, pos, mask)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager, loudly
            first_line = (str(exc).strip().splitlines() or [""])[0]
            logger.warning("torch.compile of the decode step failed, running eagerly instead (%s: %s). On the CPU "
                           "compiling needs a working C++ compiler, and int8 layers on oneDNN's kernel cannot be "
                           "traced; unset %s to skip compiling.", type(exc).__name__, first_line, COMPILE_ENV)
            self.compile = False
            self._step = None
            return None

    def _static_step(self, x: torch.Tensor, weights: list[LayerWeights], keys: list[torch.Tensor],
                     values: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """The decode step ``torch.compile`` traces: k / v written at ``pos``, attention over every position."""
        x = x.clone()  # decoder_layer updates its input in place
        for i, w in enumerate(weights):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i) -> torch.Tensor:
                keys[i].index_copy_(2, pos, k)
                values[i].index_copy_(2, pos, v)
                return _sdpa(q, keys[i], values[i], mask, False)

            x = decoder_layer(x, w, cos, sin, self.eps, self.head_dim, attend, cpu_class=self.cpu_class)
        return x
