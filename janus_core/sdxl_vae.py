"""SDXL-VAE decoding (and encoding, for img2img) of JanusFlow latents in plain Python (the CLI); ComfyUI uses its
core VAE nodes.

Uses diffusers' ``AutoencoderKL``, an optional dependency (``pip install diffusers``), imported only when a
VAE is loaded. Run the SDXL VAE in float32 or bfloat16: the original SDXL VAE overflows in float16.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import JanusError
from .generate_flow import LATENT_SIZE, SDXL_VAE_SCALING, VAE_DOWNSCALE, latent_to_sdxl_vae, sdxl_vae_to_latent
from .images import ImagesArg, images_from_decoded, to_pil_images

logger = logging.getLogger(__name__)

DEFAULT_SDXL_VAE = "stabilityai/sdxl-vae"


def load_sdxl_vae(path_or_repo: str | Path = DEFAULT_SDXL_VAE, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Any:
    """Load a diffusers-format ``AutoencoderKL`` from a local folder or a Hugging Face repo id.

    Returns the VAE in eval mode on ``device`` as ``dtype``. A repo id is taken from the Hugging Face cache
    when it is there, else downloaded (not when ``HF_HUB_OFFLINE`` is set). A single ``.safetensors`` file
    (ComfyUI's ``models/vae/sdxl_vae.safetensors``) is not accepted: pass the folder holding ``config.json``
    and ``diffusion_pytorch_model.safetensors``, or the repo id.
    """
    try:
        with warnings.catch_warnings():  # older diffusers releases warn at import about torch internals they call
            warnings.filterwarnings("ignore", category=FutureWarning)
            from diffusers import AutoencoderKL
    except ImportError as e:
        raise JanusError("Decoding JanusFlow latents outside ComfyUI needs diffusers: "
                         "pip install diffusers") from e
    source = str(path_or_repo)
    local = Path(source).expanduser()
    if local.is_file():
        raise JanusError(f"{local} is a single file; pass the diffusers VAE folder (config.json + "
                         f"diffusion_pytorch_model.safetensors) or a repo id such as '{DEFAULT_SDXL_VAE}'.")
    if dtype == torch.float16:
        logger.warning("The SDXL VAE overflows in float16 (black or NaN images) unless it is an fp16-fixed "
                       "VAE; prefer bfloat16 or float32.")
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise JanusError(f"{local} has no config.json; it is not a diffusers AutoencoderKL folder.")
        if not (local / VAE_WEIGHTS).is_file():
            raise JanusError(f"{local} has no {VAE_WEIGHTS}; pass the SDXL VAE folder (config.json + {VAE_WEIGHTS}, "
                             f"e.g. a download of '{DEFAULT_SDXL_VAE}'; pickled .bin weights are not read).")
        try:
            vae = _from_pretrained(AutoencoderKL, str(local), dtype)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise JanusError(f"{local} is not a usable diffusers AutoencoderKL folder ({reason[:200]}); pass the SDXL "
                             f"VAE folder (config.json + {VAE_WEIGHTS}, e.g. a download of "
                             f"'{DEFAULT_SDXL_VAE}'), and re-download it if its weights are damaged.") from exc
    else:
        vae = _from_hub(AutoencoderKL, source, dtype)
    _check_sdxl_shape(vae, source)
    scaling = getattr(vae.config, "scaling_factor", None)
    if scaling is not None and abs(scaling - SDXL_VAE_SCALING) > 1e-6:
        logger.warning("VAE %s has scaling_factor %s, not SDXL's %s; JanusFlow latents need the SDXL VAE.",
                       source, scaling, SDXL_VAE_SCALING)
    return vae.to(device).eval().requires_grad_(False)


VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"  # only safetensors: a pickle could run code when loaded


def _check_sdxl_shape(vae: Any, source: str) -> None:
    """Refuse a VAE whose latents are not JanusFlow's (4 channels, 8x smaller than the image)."""
    channels = getattr(vae.config, "latent_channels", None)
    blocks = getattr(vae.config, "block_out_channels", None) or ()
    downscale = 2 ** (len(blocks) - 1) if blocks else None
    if channels != 4 or downscale != VAE_DOWNSCALE:
        raise JanusError(f"The VAE {source} makes latents of {channels} channels at 1/{downscale} of the image size; "
                         f"JanusFlow needs the SDXL VAE (4 channels, 1/{VAE_DOWNSCALE}): use '{DEFAULT_SDXL_VAE}'.")


def _from_pretrained(autoencoder_cls: Any, source: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``from_pretrained`` without the diffusers notices that ask nothing of the user.

    Without ``accelerate``, diffusers falls back to ``low_cpu_mem_usage=False`` and logs "install accelerate"
    each time (passing the fallback explicitly avoids that); it passes huggingface_hub a deprecated
    ``local_dir_use_symlinks`` argument, which warns on every hub lookup; and older releases pass others
    (``resume_download``), which warn as FutureWarning.
    """
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return autoencoder_cls.from_pretrained(source, torch_dtype=dtype, use_safetensors=True, **kwargs)


def _from_hub(autoencoder_cls: Any, repo_id: str, dtype: torch.dtype) -> Any:
    """The VAE ``repo_id`` from the Hugging Face cache, else downloaded; every failure is one clear error."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    use_folder = ("pass a local diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors; "
                  "--vae on the command line)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise JanusError(f"VAE '{repo_id}' is neither an existing folder nor a Hugging Face repo id; "
                         f"{use_folder} or a repo id such as '{DEFAULT_SDXL_VAE}'.") from exc
    try:
        return _from_pretrained(autoencoder_cls, repo_id, dtype, local_files_only=True)
    except OSError:
        pass  # not in the cache
    if constants.HF_HUB_OFFLINE:
        raise JanusError(f"The VAE '{repo_id}' is not in the Hugging Face cache and downloads are off "
                         f"(HF_HUB_OFFLINE is set): {use_folder}, or run once with network access.")
    try:  # one request without retries: no network answers in seconds, not after a minute of back-off
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=10)
        logger.info("downloading the VAE %s into the Hugging Face cache", repo_id)
        return _from_pretrained(autoencoder_cls, repo_id, dtype)
    except Exception as exc:  # network, HTTP and hub errors of every huggingface_hub version
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise JanusError(f"Cannot get the VAE '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}: "
                         f"{reason}). Check the network and the repo id, or {use_folder}.") from exc


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


@torch.inference_mode()
def encode_images(vae: Any, images: ImagesArg) -> torch.Tensor:
    """384x384 images (PIL images, or an IMAGE tensor ``[B, 384, 384, 3]`` 0..1) -> JanusFlow latents
    ``[B, 4, 48, 48]`` in model space (float32, on the VAE's device): the ``init_latent`` of img2img.

    As ComfyUI's VAE Encode: pixels scaled to [-1, 1], the mean of the VAE's latent distribution (no sampling),
    then :func:`sdxl_vae_to_latent`. Images go through :mod:`janus_core.images` (8-bit RGB, alpha over white);
    other sizes are refused: scale or crop them to 384x384 first.
    """
    side = LATENT_SIZE * VAE_DOWNSCALE
    pil = to_pil_images(images, background=(255, 255, 255))
    sizes = sorted({im.size for im in pil} - {(side, side)})
    if sizes:
        raise JanusError(f"JanusFlow img2img needs {side}x{side} images, got {', '.join(f'{w}x{h}' for w, h in sizes)}"
                         f"; scale or crop them to {side}x{side} first (e.g. PIL's ImageOps.fit(image, ({side}, "
                         f"{side}))).")
    ref = next(vae.parameters())
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2).contiguous()
    pixels = pixels.to(device=ref.device, dtype=ref.dtype)
    latent = vae.encode(pixels / 127.5 - 1.0).latent_dist.mode()
    return sdxl_vae_to_latent(latent.float())


__all__ = ["DEFAULT_SDXL_VAE", "decode_latents", "encode_images", "load_sdxl_vae"]
