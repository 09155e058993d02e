"""``load_model``: a checkpoint folder -> a :class:`JanusModel` that knows its variant, tokenizer and processor.

Device and precision when not given:

* device: CUDA if available, else Apple MPS if available, else CPU.
* precision: per component (LLM, image-token head, VQ tokenizer, SigLIP, U-ViT), chosen for the device the
  model runs on by :func:`janus_core.precision.choose_precision`: bf16 on GPUs that support it, else float16
  with the VQ decoder and the image-token head in float32 (the decoder's activations overflow float16; the
  head's logits decide every token); MPS likewise; on the CPU bf16 when it has bf16 instructions, else bf16
  LLM / head weights with the convolution stacks and SigLIP in float32. A ``dtype`` given by the caller is
  used for every component (float16 still keeps those two in float32).

Before anything is allocated, the config's sizes are checked (:mod:`janus_core.config`), every weight file's
container is checked, and the number of weights config.json implies is compared with what the files hold
(:func:`check_weight_count`): first the language model alone, computed from the config, then the whole
network built on the ``meta`` device, which allocates nothing. Loading then reads the checkpoint one tensor at
a time, converting each to its final dtype and device, so no second full copy of the weights is ever held. Each
LLM layer's q/k/v and gate/up weights are stored back to back in one buffer per group (the parameters are views
of it, state-dict keys unchanged), so a decode step reads each group with one matmul.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoint import StoredSize, iter_checkpoint, stored_size, trim_heap
from .config import JanusConfig, load_config
from .errors import CheckpointError, JanusError, model_files
from .llm import LlamaRunner, cpu_unpack_layers, pack_projections, packed_slots
from .modules.composite import COMPONENT_OF, JanusARNet, JanusFlowNet
from .precision import Precision, precision_for
from .processor import ImagePreprocessor, JanusTokenizer
from .quant import folder as quant_folder
from .quant.formats import check_mode
from .quant.linear import quant_layers, quantize_modules, quantized_mode, standard_modules
from .quant.loading import QuantizedLayers

logger = logging.getLogger(__name__)

# Stored tensors the original code never uses at inference; dropped knowingly (all other keys must match).
UNUSED_KEYS = (
    re.compile(r"^(vision_model|vision_und_enc_model)\.vision_tower\.attn_pool\."),
    re.compile(r"^gen_vision_model\.quantize\.codebook_used$"),
    re.compile(r"^language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
)


def is_unused_key(name: str) -> bool:
    """Whether a stored tensor is one of :data:`UNUSED_KEYS`."""
    return any(p.search(name) for p in UNUSED_KEYS)


# The weight count config.json implies must match the files within this fraction before anything is
# allocated; smaller differences are then named tensor by tensor while loading.
SIZE_TOLERANCE = 0.05
# Bytes per value of .bin tensor data, whose dtype is only known after unpickling: bf16/fp16 up to fp32.
PICKLE_ITEMSIZES = (2, 4)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` this torch can run on; ``None`` -> :func:`default_device`."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise JanusError(f"Unknown device {str(device)!r}; use cuda, cuda:N, mps or cpu.") from exc
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise JanusError(f"Device {str(device)!r} cannot run the model here; use cuda, cuda:N, mps or cpu.")
    unavailable = f"Device {str(device)!r} is not available"
    if resolved.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise JanusError(f"{unavailable}: this torch ({torch.__version__}) is a CPU-only build. Use cpu, or "
                             "install a CUDA build of torch (pytorch.org).")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise JanusError(f"{unavailable}: torch sees {count} CUDA GPU(s); check the NVIDIA driver and "
                             "CUDA_VISIBLE_DEVICES, or use cpu.")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise JanusError(f"{unavailable}: Apple MPS needs an Apple-silicon Mac; use cpu.")
    return resolved


def _readable_count(n: int) -> str:
    """``1_490_000`` -> ``"1.49M"``, ``2_090_000_000`` -> ``"2.09B"``."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


class JanusModel:
    """A loaded Janus model: ``net`` (the ``nn.Module``), ``config``, ``tokenizer``, ``image_processor``.

    ``variant`` is ``"janus-1.3b"``, ``"janus-pro"`` or ``"janusflow"``; ``llm`` runs the language model;
    ``precision`` holds each component's dtype and ``dtype`` is the language model's.
    """

    def __init__(self, net: nn.Module, config: JanusConfig, tokenizer: JanusTokenizer,
                 image_processor: ImagePreprocessor, folder: Path, precision: Precision, *,
                 quantize_fallback: bool = True):
        self.net = net
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.folder = folder
        self.precision = precision
        self.quantize_fallback = quantize_fallback
        self.llm = LlamaRunner(net.language_model, config.llm)

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype (also the KV cache's, and the compute dtype of quantized layers)."""
        return self.precision.llm

    @property
    def quantization(self) -> str | None:
        """``"int8"`` / ``"int4"`` for a weight-only quantized model (:mod:`janus_core.quant`), else None."""
        return quantized_mode(self.net)

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def is_flow(self) -> bool:
        return self.config.is_flow

    @property
    def device(self) -> torch.device:
        return self.net.language_model.model.embed_tokens.weight.device

    def to(self, device: torch.device | str) -> JanusModel:
        """Move the weights to ``device`` (in place; returns self). Weights packed for the CPU's matmuls are
        unpacked first (:func:`janus_core.llm.cpu_unpack_layers`, :meth:`QuantWeights.unpack`)."""
        if isinstance(device, torch.dtype) or device is None:
            raise JanusError(f"JanusModel.to takes a device (cuda, mps, cpu), got {device!r}; the precision is "
                             "chosen when loading: load_model(..., dtype=...).")
        # "meta" drops the weights (releasing their memory; tests use it as a second device)
        device = torch.device("meta") if str(device) == "meta" else resolve_device(device)
        if device != self.device:
            cpu_unpack_layers(self.net.language_model)
            for layer in quant_layers(self.net).values():
                layer.unpack()
        try:
            self.net.to(device)
        except BaseException:
            self.pack_projections()  # a failed move: the kernels of wherever the weights are now
            raise
        self.pack_projections()
        return self

    def pack_projections(self) -> None:
        """Re-join the LLM's q/k/v and gate/up weights after something moved the parameters one by one, and lay
        quantized weights out for the kernels of the device they are now on.

        Cheap when nothing changed; ComfyUI's memory manager moves weights per parameter, so callers that let it
        load the model call this afterwards (see :func:`janus_core.llm.pack_projections` and
        :meth:`janus_core.quant.linear.QuantLinear.prepare`).
        """
        packed = pack_projections(self.net.language_model)
        if packed:
            logger.debug("re-joined %d projection groups on %s", packed, self.device)
        for name, layer in quant_layers(self.net).items():
            layer.prepare(weight_dtype(name, self.precision), fallback=self.quantize_fallback)

    def __repr__(self) -> str:
        quant = f", quantization={self.quantization!r}" if self.quantization else ""
        return (f"JanusModel(variant={self.variant!r}, folder='{self.folder}', device={self.device}, "
                f"dtype={self.dtype}{quant})")


def weight_dtype(name: str, precision: Precision) -> torch.dtype:
    """The dtype of the floating-point state-dict entry ``name`` under ``precision`` (by its component)."""
    return precision.of(COMPONENT_OF[name.split(".", 1)[0]])


def _materialize_rope_buffers(net: nn.Module, config: JanusConfig, device: torch.device) -> None:
    """Non-persistent rotary ``inv_freq`` buffers are not in checkpoints; compute them on ``device``."""
    head_dim = config.llm.head_dim
    for module in net.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            if not name.endswith("inv_freq"):
                raise CheckpointError(f"internal: buffer '{name}' of {type(module).__name__} was not loaded")
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
            module.register_buffer(name, 1.0 / (config.llm.rope_theta ** exponent), persistent=False)


def _listing(names: list[str], sep: str = ", ", limit: int = 20) -> str:
    return sep.join(names[:limit]) + (" ..." if len(names) > limit else "")


def load_weights(net: nn.Module, config: JanusConfig, folder: Path, device: torch.device, precision: Precision,
                 quantized: QuantizedLayers | None = None) -> None:
    """Fill the meta-device ``net`` from the checkpoint in ``folder`` (strict: every key and shape must match).

    Every weight is read into its final memory (dtype, device; the LLM's q/k/v and gate/up into their joined
    buffers, see :func:`janus_core.llm.packed_slots`) when the file format allows, and copied there otherwise.
    With ``quantized``, the tensors of its layers go to it (quantized while streaming, or read from a quantized
    folder) and the checkpoint is streamed (:func:`janus_core.checkpoint.iter_checkpoint`).
    """
    expected = {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
    stream = quantized is not None
    if quantized is not None:
        for name in quantized.stored_names:
            expected.pop(name)
    slots = {} if stream else packed_slots(net.language_model, "language_model.", device, precision.llm)

    def destination(name: str) -> torch.Tensor | None:
        """The final memory of a floating-point weight (its joined buffer's slice, or a new tensor)."""
        if quantized is not None and quantized.accepts(name):
            return quantized.destination(name)
        if name not in slots and name in expected and expected[name][1].is_floating_point:
            slots[name] = torch.empty(expected[name][0], dtype=weight_dtype(name, precision), device=device)
        return slots.get(name)

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    dropped = 0
    by_rows = quantized.accepts if quantized is not None and quantized.targets is not None else None
    for name, tensor in iter_checkpoint(folder, destination=destination, stream=stream, by_rows=by_rows):
        if quantized is not None and quantized.accepts(name):
            problem = quantized.take(name, tensor)
            if problem is not None:
                misshaped.append(problem)
            continue
        if name not in expected:
            if is_unused_key(name):
                dropped += 1
            else:
                unexpected.append(name)
            continue
        shape, kind = expected[name]
        if tuple(tensor.shape) != shape:
            misshaped.append(f"{name}: checkpoint {list(tensor.shape)} vs model {list(shape)}")
            continue
        if tensor.dtype.is_floating_point != kind.is_floating_point:
            misshaped.append(f"{name}: checkpoint {tensor.dtype} vs model {kind} (integer and floating-point types)")
            continue
        slot = slots.get(name)
        if slot is not None:
            if tensor is not slot:  # pickles, which cannot be read into given memory
                slot.copy_(tensor)
            loaded[name] = slot
            continue
        target = weight_dtype(name, precision) if tensor.is_floating_point() else tensor.dtype
        value = tensor.to(device=device, dtype=target)
        loaded[name] = value.clone() if stream and value is tensor else value  # streamed memory is only lent
    missing = set(expected) - set(loaded)
    if quantized is not None:
        missing |= set(quantized.missing())
    missing = sorted(missing - {m.split(":")[0] for m in misshaped})
    problems = []
    if misshaped:
        problems.append("tensors of the wrong shape or type (config.json and weights disagree):\n  "
                        + _listing(misshaped, "\n  "))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): " + _listing(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensor(s): " + _listing(unexpected))
    if problems:
        if any(name.endswith(quant_folder.QUANTIZED_SUFFIXES) for name in unexpected):
            problems.append(f"the quantized layers stored do not match the list in {quant_folder.QUANT_FILE}, "
                            "which was edited or belongs to another folder: quantize the original checkpoint again")
        raise CheckpointError(f"The checkpoint in {folder} does not match its config.json; "
                              + "; ".join(problems) + ". Re-download the checkpoint or check the variant.")
    net.load_state_dict(loaded, strict=quantized is None, assign=True)
    _materialize_rope_buffers(net, config, device)
    if stream:
        trim_heap()  # the source tensors and quantization temporaries are gone
    logger.info("loaded %d tensors from %s (%d unused stored tensors dropped)", len(loaded), folder, dropped)


def check_weight_count(stored: StoredSize, folder: Path, expected: int, *, exact: bool = True) -> None:
    """Refuse when config.json implies ``expected`` weights and the files in ``folder`` hold another number.

    The count compared is the number of values: safetensors headers give it exactly (the stored-but-unused
    tensors of :data:`UNUSED_KEYS` left out); ``.bin`` tensor data allows :data:`PICKLE_ITEMSIZES` bytes per
    value. Differences within :data:`SIZE_TOLERANCE` pass and are named tensor by tensor while loading.
    With ``exact=False``, ``expected`` counts only part of the model and only a larger count is refused.
    """
    fewest = stored.elements + stored.pickle_bytes // max(PICKLE_ITEMSIZES)
    most = stored.elements + stored.pickle_bytes // min(PICKLE_ITEMSIZES)
    too_few = exact and expected < fewest * (1 - SIZE_TOLERANCE)
    if not too_few and expected <= most * (1 + SIZE_TOLERANCE):
        return
    held = f"{fewest:,}" if fewest == most else f"{fewest:,} to {most:,} (.bin files: bf16/fp16 to fp32)"
    raise CheckpointError(
        f"{folder / 'config.json'} describes a model of {'' if exact else 'at least '}{expected:,} weights but "
        f"the weight files in {folder} hold {held}: config.json and the weights belong to different models, or "
        "a weight file is incomplete. Re-download the checkpoint (config.json and the weights of one release)."
    )


def load_model(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               variant: str | None = None, quantize: str | None = None, *, quantize_lm_head: bool = True,
               quantize_embeddings: bool = True, quantize_fallback: bool = True,
               compute_device: torch.device | str | None = None) -> JanusModel:
    """Load the checkpoint folder ``path`` (config.json, tokenizer.json, weights) as a :class:`JanusModel`.

    ``device`` (where the weights are read to) and the precision default to the policy in this module's
    docstring; ``dtype`` forces one dtype; ``compute_device`` (default ``device``) is where the model will run,
    which the automatic precision is chosen for (ComfyUI reads weights to the CPU and runs them on a GPU).
    ``variant`` forces ``"janus-1.3b"`` or ``"janus-pro"`` prompt roles (``None`` detects the variant).

    ``quantize`` ``"int8"`` / ``"int4"`` quantizes the language model's linear layers, the image-token head,
    (``quantize_lm_head``) ``lm_head`` and (``quantize_embeddings``) the text-token embedding table while the
    checkpoint streams in (:mod:`janus_core.quant`); the precision stays that of everything else and the compute
    dtype of the quantized matmuls. A quantized folder
    (:func:`janus_core.quant.folder.save_quantized`) loads in its own mode with ``quantize=None`` or the same
    mode. ``quantize_fallback=False`` refuses a device without a working kernel instead of using the slower
    dequantize-then-matmul path. When ``compute_device`` is not ``device``, quantized weights are laid out for
    its kernels by :meth:`JanusModel.pack_projections` after the move.
    """
    if not isinstance(path, str | os.PathLike):
        raise JanusError(f"load_model takes a checkpoint folder (a str or Path), got {type(path).__name__}.")
    for name, flag in (("quantize_lm_head", quantize_lm_head), ("quantize_embeddings", quantize_embeddings),
                       ("quantize_fallback", quantize_fallback)):
        if not isinstance(flag, bool):
            raise JanusError(f"{name} must be True or False, got {flag!r}.")
    folder = Path(path).expanduser()
    with model_files(str(folder)):  # an unreadable file or folder: named, with what to do
        config = load_config(folder, variant=variant)
        tokenizer = JanusTokenizer(folder)
        image_processor = ImagePreprocessor.from_folder(folder)
        device = resolve_device(device)
        # where the weights will run (ComfyUI: its compute device); only the precision is chosen for it here
        compute = torch.device(compute_device) if compute_device is not None else device
        if dtype is not None and dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise JanusError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32 (or None: the "
                             f"automatic choice), got {dtype!r}; for int8 / int4 use quantize=.")
        precision = precision_for(compute, dtype)
        if quantize is not None:
            check_mode(quantize)
        if config.llm.vocab_size < tokenizer.vocab_size:
            raise CheckpointError(
                f"tokenizer.json has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                f"{config.llm.vocab_size}; the tokenizer belongs to another model."
            )
        if image_processor.image_size != config.siglip.image_size:
            raise CheckpointError(
                f"preprocessor_config.json in {folder} resizes images to {image_processor.image_size} pixels but the "
                f"vision tower of config.json takes {config.siglip.image_size}; the files belong to different "
                "models. Re-download the checkpoint."
            )
        stored_folder = quant_folder.read_quantization(folder)
        stored = stored_size(folder, skip=is_unused_key)
        llm_values = (config.llm.parameter_count if stored_folder is None else
                      quant_folder.quantized_llm_elements(config.llm, stored_folder.mode, stored_folder.lm_head,
                                                          stored_folder.embeddings))
        check_weight_count(stored, folder, llm_values, exact=False)  # before building anything
        try:
            with torch.device("meta"):
                net = JanusFlowNet(config) if config.is_flow else JanusARNet(config)
        except (ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{folder / 'config.json'} describes a network that cannot be built ({exc}). Fix config.json or "
                "re-download the checkpoint."
            ) from exc
        if stored_folder is not None:  # the net as the folder stores it: its layers already quantized
            quant_folder.check_folder(folder, stored_folder, net, quantize)
            quantize_modules(net, stored_folder.mode, list(stored_folder.modules))
            quant_folder.check_stored_dtypes(folder, quant_layers(net))
        check_weight_count(stored, folder, sum(t.numel() for t in net.state_dict().values()))
        quantized = None
        if stored_folder is not None or quantize is not None:
            # targets: the layers to quantize while the checkpoint streams in (None: the folder's are quantized)
            targets = (None if stored_folder is not None else
                       quantize_modules(net, quantize, standard_modules(net, quantize_lm_head, quantize_embeddings)))
            quantized = QuantizedLayers(net, device, lambda name: weight_dtype(name, precision), targets,
                                        prepare=compute == device, fallback=quantize_fallback)
        load_weights(net, config, folder, device, precision, quantized)
        if quantized is not None:
            pack_projections(net.language_model)  # joins layers left in full precision, if any
        net.eval().requires_grad_(False)
        n_params = sum(p.numel() for p in net.parameters())
        logger.info("%s: %s parameters on %s; precision: %s%s", config.variant, _readable_count(n_params), device,
                    precision.describe(),
                    f" ({quantized_mode(net)} layers: {param_bytes_of(net) / 1e9:.2f} GB)" if quantized else "")
        return JanusModel(net, config, tokenizer, image_processor, folder, precision,
                          quantize_fallback=quantize_fallback)


def param_bytes_of(net: nn.Module) -> int:
    """Bytes held by the parameters of ``net`` (quantized ones at their packed size)."""
    return sum(p.numel() * p.element_size() for p in net.parameters())


def param_bytes(model: JanusModel) -> int:
    """Bytes held by the model's parameters (quantized ones at their packed size)."""
    return param_bytes_of(model.net)


__all__ = ["JanusModel", "load_model", "default_device", "param_bytes", "resolve_device", "weight_dtype"]
