"""SDXL-VAE decoding of JanusFlow latents in plain Python (the CLI); ComfyUI decodes with its core nodes.

Uses diffusers' ``AutoencoderKL``, an optional dependency (``pip install diffusers``), imported only when a
VAE is loaded. Run the SDXL VAE in float32 or bfloat16: the original SDXL VAE overflows in float16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .errors import JanusError
from .generate_flow import SDXL_VAE_SCALING, latent_to_sdxl_vae
from .images import images_from_decoded

logger = logging.getLogger(__name__)

DEFAULT_SDXL_VAE = "stabilityai/sdxl-vae"


def load_sdxl_vae(path_or_repo: str | Path = DEFAULT_SDXL_VAE, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Any:
    """Load a diffusers-format ``AutoencoderKL`` from a local folder or a Hugging Face repo id (downloads).

    Returns the VAE in eval mode on ``device`` as ``dtype``. A single ``.safetensors`` file (ComfyUI's
    ``models/vae/sdxl_vae.safetensors``) is not accepted: pass the folder holding ``config.json`` and
    ``diffusion_pytorch_model.safetensors``, or the repo id.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise JanusError("Decoding JanusFlow latents outside ComfyUI needs diffusers: "
                         "pip install diffusers") from e
    source = str(path_or_repo)
    local = Path(source).expanduser()
    if local.is_file():
        raise JanusError(f"{local} is a single file; pass the diffusers VAE folder (config.json + "
                         f"diffusion_pytorch_model.safetensors) or a repo id such as '{DEFAULT_SDXL_VAE}'.")
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise JanusError(f"{local} has no config.json; it is not a diffusers AutoencoderKL folder.")
        source = str(local)
    if dtype == torch.float16:
        logger.warning("The SDXL VAE overflows in float16 (black or NaN images) unless it is an fp16-fixed "
                       "VAE; prefer bfloat16 or float32.")
    vae = AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    scaling = getattr(vae.config, "scaling_factor", None)
    if scaling is not None and abs(scaling - SDXL_VAE_SCALING) > 1e-6:
        logger.warning("VAE %s has scaling_factor %s, not SDXL's %s; JanusFlow latents need the SDXL VAE.",
                       source, scaling, SDXL_VAE_SCALING)
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def decode_latents(vae: Any, z_scaled: torch.Tensor) -> torch.Tensor:
    """JanusFlow latents ``[B, 4, 48, 48]`` in model space -> images ``[B, 384, 384, 3]`` float32 0..1 (CPU).

    As the reference: ``vae.decode(z / 0.13025)``, then ``(x.clamp(-1, 1) + 1) / 2`` (ComfyUI's IMAGE layout).
    """
    if not isinstance(z_scaled, torch.Tensor) or z_scaled.dim() != 4 or z_scaled.shape[1] != 4:
        got = list(z_scaled.shape) if isinstance(z_scaled, torch.Tensor) else type(z_scaled).__name__
        raise JanusError(f"Expected JanusFlow latents of shape [B, 4, H, W], got {got}.")
    ref = next(vae.parameters())
    x = latent_to_sdxl_vae(z_scaled.to(device=ref.device, dtype=ref.dtype))
    return images_from_decoded(vae.decode(x).sample)


__all__ = ["DEFAULT_SDXL_VAE", "decode_latents", "load_sdxl_vae"]
