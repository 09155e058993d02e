"""Images as VQ tokens (Janus / Janus-Pro): the VQ tokenizer's encoder, and masks over the token grid.

:func:`encode_image_tokens` runs the model's image preprocessing (:class:`processor.ImagePreprocessor`: the long
side to the image size, bicubic, padded to a centred square with grey, normalised) and returns each image's nearest
VQ codebook entries in raster order: the tokens generation produces and ``decode_image_tokens`` decodes.

Token masks select which of a set of init tokens generation samples anew (True = resample; kept tokens are
teacher-forced). :func:`pixel_mask_to_tokens` derives one from a pixel mask of the encoded image (ComfyUI's
``MASK``, 0..1, 1 = regenerate) by the preprocessing's geometry:

1. a pixel of the mask is painted when it is at least 0.5;
2. the painted pixels are fitted like the image: its long side to the image size and the short side in
   proportion (:meth:`ImagePreprocessor.fitted_size`), each fitted pixel painted when any mask pixel it covers is
   (a max-pool: a 1-px stroke on a 4k image survives the shrinking), centred on a square of the image size
   padded with "keep", so the grey padding of a non-square image is always kept;
3. each token covers a square cell of ``image size / grid side`` pixels (16 x 16 for the releases) and is
   resampled when any pixel of its cell is painted, so every token a painted region touches is redrawn.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .errors import JanusError
from .images import ImagesArg, unit_floats_to_uint8
from .memory import Progress, fitting_chunks
from .model import JanusModel
from .modules.vq import encoder_activation_bytes
from .prompts import require_ar

logger = logging.getLogger(__name__)


def vq_dtype(model: JanusModel) -> torch.dtype:
    """The dtype the VQ tokenizer runs in (float32 under a float16 model, see :mod:`janus_core.model`)."""
    return model.net.gen_vision_model.post_quant_conv.weight.dtype


def encode_bytes(model: JanusModel, batch: int) -> int:
    """Peak bytes :func:`encode_image_tokens` allocates on the VQ tokenizer's device for ``batch`` images at once:
    the pixels (float32 and cast) and the encoder's activations (:func:`modules.vq.encoder_activation_bytes`)."""
    vq, size, dtype = model.config.vq, model.image_processor.image_size, vq_dtype(model)
    pixels = batch * 3 * size * size * (4 + dtype.itemsize)
    return pixels + encoder_activation_bytes(vq.ch, vq.ch_mult, vq.codebook_size, size, batch, dtype)


def vq_codes(model: JanusModel, pixels: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
    """Preprocessed pixels ``[N, 3, S, S]`` -> VQ codes ``[N, rows * cols]`` (LongTensor on the tokenizer's device).

    Encodes as many images at once as fit the device's free memory (:func:`encode_bytes`); refused with a
    :class:`JanusError` only when not even one fits. ``progress(done, N)``: see :func:`memory.fitting_chunks`.
    """
    vq = model.net.gen_vision_model
    device, dtype = vq.post_quant_conv.weight.device, vq_dtype(model)
    spans = fitting_chunks(device, pixels.shape[0], lambda n: encode_bytes(model, n), "VQ encoding", progress)
    return torch.cat([vq.encode_to_codes(pixels[span].to(device=device, dtype=dtype)) for span in spans])


@torch.inference_mode()
def encode_image_tokens(model: JanusModel, images: ImagesArg, progress: Progress | None = None) -> torch.Tensor:
    """VQ tokens ``[N, rows * cols]`` (LongTensor on the CPU; 576 = 24 x 24 for the releases) of ``images``: PIL
    images of any mode or an IMAGE tensor ``[N, H, W, 3]`` in 0..1 (rules: :mod:`janus_core.images`), after the
    model's image preprocessing (see the module docstring). Janus / Janus-Pro models only. ``progress(done, N)``
    is called after every few images (raise in it to cancel)."""
    require_ar(model, "VQ encoding")
    return vq_codes(model, model.image_processor.batch(images), progress).cpu()


def _rows_of(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    """``value [B', ...]`` checked to have 1 or ``batch`` rows."""
    if value.shape[0] not in (1, batch):
        raise JanusError(f"{name} holds {value.shape[0]} rows for a batch of {batch}; give one (shared by every "
                         f"image) or one per image.")
    return value


def token_mask(model: JanusModel, mask: object, batch: int) -> torch.Tensor:
    """A token mask (bool tensor, True = resample: ``[rows * cols]``, ``[rows, cols]``, or one per image
    ``[B', rows * cols]`` / ``[B', rows, cols]`` with ``B'`` 1 or ``batch``) as bool ``[B', rows * cols]``."""
    rows, cols = model.config.image_token_grid
    shapes = f"[{rows * cols}], [{rows}, {cols}], [B, {rows * cols}] or [B, {rows}, {cols}]"
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise JanusError(f"The mask must be a bool tensor (True = resample) of shape {shapes}, got {got}. For a "
                         "pixel mask (ComfyUI MASK, 0..1) use janus_core.image_tokens.pixel_mask_to_tokens.")
    shape = tuple(mask.shape)
    if shape[-2:] == (rows, cols) and mask.dim() in (2, 3):
        mask = mask.reshape(*shape[:-2], rows * cols)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[1] != rows * cols:
        raise JanusError(f"The mask has shape {list(shape)}; this model's token grid is {rows} x {cols}, so it "
                         f"must be {shapes} (a mask made for another model or image size?).")
    return _rows_of("The mask", mask, batch)


def kept_prefix(resample: torch.Tensor) -> int:
    """Leading positions every row keeps, before the first position any row resamples (``resample [B, n]``)."""
    return int(resample.any(dim=0).long().argmax()) if bool(resample.any()) else resample.shape[1]


def check_init_tokens(model: JanusModel, init_tokens: object, mask: object, batch: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(init [batch, n] long, resample [batch, n] bool)`` on the model's device from ``init_tokens``
    (``[n]`` or ``[B', n]`` integer VQ ids of this model, ``B'`` 1 or ``batch``) and a :func:`token_mask`."""
    if init_tokens is None or mask is None:
        missing = "mask" if mask is None else "init_tokens"
        raise JanusError(f"init_tokens and mask go together (the mask says which init tokens to resample); the "
                         f"{missing} is missing. A mask of all True with any init tokens is plain generation.")
    n = model.config.vq.codebook_size
    rows, cols = model.config.image_token_grid
    if (not isinstance(init_tokens, torch.Tensor) or init_tokens.dtype.is_floating_point
            or init_tokens.dtype == torch.bool or init_tokens.dtype.is_complex):
        got = f"a {init_tokens.dtype} tensor" if isinstance(init_tokens, torch.Tensor) else type(init_tokens).__name__
        raise JanusError(f"init_tokens must be an integer tensor of VQ ids [B, {rows * cols}] (from "
                         f"encode_image_tokens or generate_image_tokens), got {got}.")
    tokens = init_tokens[None] if init_tokens.dim() == 1 else init_tokens
    if tokens.dim() != 2 or tokens.shape[1] != rows * cols:
        raise JanusError(f"init_tokens has shape {list(init_tokens.shape)}; this model's images are "
                         f"{rows} x {cols} = {rows * cols} tokens, so it must be [{rows * cols}] or "
                         f"[B, {rows * cols}] (tokens of another model?).")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= n):
        raise JanusError(f"init_tokens holds ids from {int(tokens.min())} to {int(tokens.max())}, but this model's "
                         f"VQ codebook has {n} entries (0..{n - 1}): they belong to another model.")
    tokens = _rows_of("init_tokens", tokens, batch)
    resample = token_mask(model, mask, batch)
    device = model.device
    return (tokens.to(device=device, dtype=torch.long).expand(batch, -1).contiguous(),
            resample.to(device).expand(batch, -1).contiguous())


def pixel_mask_to_tokens(model: JanusModel, mask: torch.Tensor) -> torch.Tensor:
    """A pixel mask ``[B, H, W]`` or ``[H, W]`` (float 0..1, 1 = regenerate; ComfyUI's MASK) of an image of
    ``H x W`` pixels -> token mask bool ``[B, rows, cols]`` (True = resample), by the rule in the module docstring."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or 0 in mask.shape:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise JanusError(f"The MASK must be a tensor [B, H, W] (or [H, W]) of values in 0..1, got {got}.")
    values = unit_floats_to_uint8(mask if mask.is_floating_point() else mask.float(), "The MASK")
    painted = (values >= 128).float().reshape(-1, 1, *mask.shape[-2:])  # 128 / 255: at least 0.5
    processor = model.image_processor
    height, width = mask.shape[-2:]
    new_w, new_h = processor.fitted_size(width, height)
    side = processor.image_size
    canvas = torch.zeros(painted.shape[0], 1, side, side)
    top, left = (side - new_h) // 2, (side - new_w) // 2
    canvas[:, :, top:top + new_h, left:left + new_w] = F.adaptive_max_pool2d(painted, (new_h, new_w))
    rows, _ = model.config.image_token_grid
    return F.max_pool2d(canvas, side // rows)[:, 0] > 0
