"""JanusFlow ODE Sampler node: rectified-flow text-to-image into a ComfyUI LATENT (SDXL-VAE space)."""

from __future__ import annotations

from janus_core.errors import JanusError
from janus_core.generate_flow import FlowCFG, flow_bytes, initial_noise, iter_flow_steps, latent_to_sdxl_vae
from janus_core.sampling import SEED_MAX

from . import comfy_services as comfy
from .loader import JanusModelHandle
from .text_to_image import model_input


class DSJanusFlowSampler:
    DESCRIPTION = ("Generates JanusFlow images by integrating the rectified-flow ODE (Euler steps with "
                   "classifier-free guidance). Outputs an SDXL-VAE LATENT: decode it with the core Load VAE "
                   "(sdxl_vae.safetensors) + VAE Decode nodes.")
    CATEGORY = "Janus"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input("A JanusFlow-1.3B model from Janus Model Loader."),
            "cfg_pair": ("DSJANUS_CFG", {"tooltip": "From Janus CFG Pair Builder (same JanusFlow model)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": "Image i of the batch starts "
                             "from the noise of seed + i."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Euler steps of the ODE."}),
            "cfg_weight": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Guidance: "
                                     "v = w * v_cond - (w - 1) * v_uncond. 1 = no guidance."}),
        }}

    def sample(self, model: JanusModelHandle, cfg_pair: FlowCFG, seed: int, steps: int, cfg_weight: float):
        if not isinstance(cfg_pair, FlowCFG):
            raise JanusError("This CFG pair was built for a Janus / Janus-Pro model; the flow sampler needs one "
                             "built with a JanusFlow model.")
        m = model.ready(flow_bytes(model.model, cfg_pair, cfg_weight))
        progress = comfy.Progress(steps)
        previewer = comfy.sdxl_latent_previewer(m.device)  # z is SDXL-scaled, as ComfyUI's previewers expect
        z = None
        for st in iter_flow_steps(m, cfg_pair, initial_noise(m, cfg_pair.batch_size, seed), steps, cfg_weight):
            z = st.z
            # the preview shows where the image is heading, not the still-noisy z
            progress.update(st.step + 1, previewer(st.predicted_clean()[:1]) if previewer is not None else None)
        return ({"samples": latent_to_sdxl_vae(z.float()).cpu()},)
