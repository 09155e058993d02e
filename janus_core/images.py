"""Image conversions: user images (ComfyUI IMAGE tensors, PIL images of any mode) to the 8-bit RGB the
vision encoder reads, and decoder outputs back to ComfyUI's IMAGE layout.

Input rules (the one place they are applied; understanding and every other image input go through here):

- IMAGE tensors are ``[B, H, W, 3]``. Floating point (float16/bfloat16/float32/float64) must hold 0..1 as
  ComfyUI defines IMAGE (values up to :data:`RANGE_TOLERANCE` outside are clamped, anything further is
  refused with the range found); NaN/inf are refused. ``uint8`` is taken as 0..255 exactly. Other dtypes
  (bool, int16/32/64) are refused: their range is ambiguous.
- PIL images: ``I;16*`` are 16-bit grey, scaled by 255/65535 (never clipped at 255); ``I`` (32-bit integer)
  is read as 16-bit data as Pillow makes it from 16-bit PNG/TIFF files, values outside 0..65535 are refused;
  ``F`` (float) must hold 0..1 like IMAGE tensors; images with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``,
  ``La``, or ``P``/``L``/``RGB`` with a transparency key) are composited over ``background``; ``1``, ``L``,
  ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` use Pillow's conversion (no ICC colour management).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import JanusError

ImagesArg = Sequence[Image.Image] | torch.Tensor
Background = tuple[int, int, int]

RANGE_TOLERANCE = 1e-3  # how far float pixels may stray outside 0..1 (rounding of upstream nodes)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def images_from_decoded(decoded: torch.Tensor) -> torch.Tensor:
    """Decoder output ``[B, 3, H, W]`` nominally in [-1, 1] -> ``[B, H, W, 3]`` float32 0..1 on the CPU."""
    return ((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, 3]`` 0..1 -> uint8, truncating like the reference (and ComfyUI's Save Image)."""
    return (images * 255.0).clamp(0, 255).to(torch.uint8)


def unit_floats_to_uint8(values: torch.Tensor, what: str) -> torch.Tensor:
    """Float pixels in 0..1 -> uint8 0..255 (rounded, so ``uint8 / 255`` gives its pixels back exactly).

    Refuses NaN/inf and values further than :data:`RANGE_TOLERANCE` outside 0..1, naming ``what`` and the
    range found.
    """
    values = values.detach().cpu().float()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise JanusError(f"{what} contains {bad} NaN/infinite value(s); pixel values must be finite numbers in "
                         "0..1. Fix the node or code that produced it.")
    low, high = float(values.min()), float(values.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        if low >= -RANGE_TOLERANCE and high <= 255.0 + RANGE_TOLERANCE:
            hint = "it looks like 0..255 values: divide them by 255"
        elif low >= -1.0 - RANGE_TOLERANCE and high <= 1.0 + RANGE_TOLERANCE:
            hint = "it looks like -1..1 values: map them with (x + 1) / 2"
        else:
            hint = "rescale it to 0..1"
        raise JanusError(f"{what} holds values from {low:.6g} to {high:.6g}, but float pixels must be in 0..1; "
                         f"{hint}.")
    return (values.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def image_tensor_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, 3]`` (float 0..1, or uint8) -> uint8 ``[B, H, W, 3]`` on the CPU."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise JanusError(
            f"The IMAGE tensor has shape {list(images.shape)}, expected [B, H, W, 3] (batch, height, width, RGB "
            "channels, values in 0..1) as ComfyUI's IMAGE type. Convert masks or RGBA images to RGB first."
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise JanusError(f"The IMAGE tensor of shape {list(images.shape)} holds no pixels; give at least one image.")
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    if not images.dtype.is_floating_point:
        raise JanusError(
            f"The IMAGE tensor has dtype {images.dtype}; images must be floats in 0..1 (ComfyUI's IMAGE) or "
            "uint8 in 0..255. Convert it, e.g. x.float() / 255 for 8-bit or x.float() / 65535 for 16-bit data."
        )
    return unit_floats_to_uint8(images, "The IMAGE tensor")


def _grey_to_rgb(grey: np.ndarray | torch.Tensor) -> Image.Image:
    return Image.fromarray(np.asarray(grey, dtype=np.uint8), "L").convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` grey holding 0..65535 -> RGB, scaled by 255/65535 (so ``v * 257`` gives back ``v``)."""
    values = np.asarray(image).astype(np.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise JanusError(
            f"A mode '{image.mode}' (32-bit integer) image holds values from {low} to {high}; mode I images are "
            "read as 16-bit grey (0..65535, what Pillow makes of 16-bit PNG/TIFF files). Convert it to 8-bit "
            "('L') or RGB yourself, with the scaling its data needs."
        )
    return _grey_to_rgb(np.rint(values * (255.0 / 65535.0)))


def pil_to_rgb(image: Image.Image, background: Background) -> Image.Image:
    """A PIL image of any mode -> 8-bit RGB, by the rules in this module's docstring.

    Transparent pixels are composited over ``background`` (RGB 0..255; Janus passes its padding grey, so
    transparency looks like the padding the preprocessor adds around non-square images).
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _sixteen_bit_to_rgb(image)
    if mode == "F":
        what = "A mode 'F' (float) image"
        return _grey_to_rgb(unit_floats_to_uint8(torch.from_numpy(np.array(image, dtype=np.float32)), what))
    if mode == "La":  # premultiplied; Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def to_pil_images(images: ImagesArg, background: Background) -> list[Image.Image]:
    """PIL images (any mode; one image or a sequence) or an IMAGE tensor ``[B, H, W, 3]`` -> 8-bit RGB images.

    Tensor rules: :func:`image_tensor_to_uint8`; PIL rules: :func:`pil_to_rgb` (``background`` for alpha).
    """
    if isinstance(images, torch.Tensor):
        return [Image.fromarray(np.ascontiguousarray(a)) for a in image_tensor_to_uint8(images).numpy()]
    if isinstance(images, Image.Image):
        images = [images]
    expected = "expected a list of PIL images or an IMAGE tensor [B, H, W, 3]"
    if isinstance(images, str | bytes | os.PathLike):
        raise JanusError(f"Got a file name or bytes, not an image; open it first (PIL.Image.open): {expected}.")
    if not isinstance(images, list | tuple):
        raise JanusError(f"Got a {type(images).__name__}; {expected}.")
    if not images:
        raise JanusError(f"No images were given; {expected}.")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise JanusError(
                f"Image {i} is a {type(image).__name__}; expected PIL images or an IMAGE tensor [B, H, W, 3]."
            )
        if 0 in image.size:
            raise JanusError(f"Image {i} is empty ({image.width}x{image.height} pixels).")
        try:
            out.append(pil_to_rgb(image, background))
        except JanusError as exc:
            raise JanusError(f"Image {i}: {exc}") from None
        except (OSError, ValueError) as exc:  # unreadable file data, or a mode this Pillow cannot convert
            raise JanusError(f"Image {i} (mode '{image.mode}') cannot be converted to RGB: {exc}. Convert it "
                             "to RGB first, or re-save the file.") from exc
    return out
