"""JanusFlow ODE Sampler node: rectified-flow text-to-image (or img2img from a LATENT) into a ComfyUI LATENT."""

from __future__ import annotations

import torch

from janus_core.errors import JanusError
from janus_core.generate_flow import (
    FlowCFG,
    flow_bytes,
    initial_noise,
    iter_flow_steps,
    latent_to_sdxl_vae,
    sdxl_vae_to_latent,
)
from janus_core.sampling import SEED_MAX

from . import comfy_services as comfy
from .loader import JanusModelHandle
from .text_to_image import model_input


def latent_inputs(latent: dict | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A ComfyUI ``LATENT`` -> ``(init_latent, noise_mask)`` for :func:`iter_flow_steps` (``(None, None)``
    without one). ``samples`` (VAE Encode's unscaled SDXL-VAE latent) is scaled into JanusFlow's space; the
    ``noise_mask`` of Set Latent Noise Mask / VAE Encode (for Inpainting) is passed on as it is."""
    if latent is None:
        return None, None
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise JanusError("The latent input needs a LATENT with 'samples' (a tensor): connect a VAE Encode node "
                         "(Load VAE: sdxl_vae.safetensors) fed with a 384x384 image.")
    if samples.dim() != 4:
        raise JanusError(f"The latent input is {samples.dim()}-D {list(samples.shape)} (a video latent?); it needs an "
                         "image LATENT [B, 4, 48, 48]: VAE Encode (Load VAE: sdxl_vae.safetensors) of a 384x384 image.")
    return sdxl_vae_to_latent(samples), latent.get("noise_mask")


def noise_offsets(latent: dict | None, batch: int) -> list[int] | None:
    """Each image's seed offset for its starting noise: None (image i: seed + i), or core's ``batch_index`` of the
    LATENT (Latent From Batch), so an image picked out of a batch is redrawn as it was there (one index for the
    whole batch counts on from it)."""
    index = latent.get("batch_index") if isinstance(latent, dict) else None
    if index is None:
        return None
    whole = isinstance(index, list | tuple) and all(isinstance(i, int) and i >= 0 for i in index)
    if whole and len(index) == batch:
        return list(index)
    if whole and len(index) == 1:
        return [index[0] + i for i in range(batch)]
    raise JanusError(f"The latent's batch_index must list one whole number >= 0 per image (or one for all), "
                     f"got {str(index)[:60]} for {batch} image(s); remake the latent with core latent nodes.")


class DSJanusFlowSampler:
    DESCRIPTION = ("Generates JanusFlow images by integrating the rectified-flow ODE (Euler steps with "
                   "classifier-free guidance). Outputs an SDXL-VAE LATENT: decode it with the core Load VAE "
                   "(sdxl_vae.safetensors) + VAE Decode nodes. With a latent (VAE Encode of a 384x384 image) and "
                   "denoise < 1 it redraws that image (img2img); a noise mask on the latent limits it to the "
                   "masked area (inpainting).")
    CATEGORY = "Janus"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input("A JanusFlow-1.3B model from Janus Model Loader."),
                "cfg_pair": ("DSJANUS_CFG", {"tooltip": "From Janus CFG Pair Builder (same JanusFlow model)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": "Image i of the batch starts "
                                 "from the noise of seed + i."}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Euler steps of the ODE (the "
                                  "steps actually run: with denoise < 1 they cover the last part of the way)."}),
                "cfg_weight": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                                         "Guidance: v = w * v_cond - (w - 1) * v_uncond. 1 = no guidance."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Optional image to start from (img2img): VAE Encode of a 384x384 "
                                      "image with the SDXL VAE. One latent serves every image of the batch, or "
                                      "give one per image. Its noise mask (Set Latent Noise Mask, VAE Encode for "
                                      "Inpainting) limits the change to the masked area."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "How much "
                                      "of the latent is redrawn: the run starts from it re-noised to time 1 - "
                                      "denoise. 1 = ignore its content (text-to-image; with a mask: inpaint from "
                                      "noise), small = stay close to it. Below 1 needs a latent."}),
            },
        }

    def sample(self, model: JanusModelHandle, cfg_pair: FlowCFG, seed: int, steps: int, cfg_weight: float,
               latent: dict | None = None, denoise: float = 1.0):
        if not isinstance(cfg_pair, FlowCFG):
            raise JanusError("This CFG pair was built for a Janus / Janus-Pro model; the flow sampler needs one "
                             "built with a JanusFlow model.")
        init_latent, noise_mask = latent_inputs(latent)
        m = model.ready(flow_bytes(model.model, cfg_pair, cfg_weight, init_latent is not None))
        progress = comfy.Progress(steps)
        previewer = comfy.sdxl_latent_previewer(m.device)  # z is SDXL-scaled, as ComfyUI's previewers expect
        z = None
        noise = initial_noise(m, cfg_pair.batch_size, seed, noise_offsets(latent, cfg_pair.batch_size))
        for st in iter_flow_steps(m, cfg_pair, noise, steps, cfg_weight, init_latent, denoise, noise_mask):
            z = st.z
            # the preview shows where the image is heading, not the still-noisy z
            progress.update(st.step + 1, previewer(st.predicted_clean()[:1]) if previewer is not None else None)
        # as core KSampler: the input LATENT's other entries (noise_mask, batch_index) travel on
        return ({**(latent or {}), "samples": latent_to_sdxl_vae(z.float()).cpu()},)
