"""ComfyUI nodes of ComfyUI-Janus (thin glue over janus_core)."""

from . import comfy_services
from .flow import DSJanusFlowSampler
from .loader import DSJanusModelLoader
from .text_to_image import (
    DSJanusARSampler,
    DSJanusCFGPair,
    DSJanusPromptEncoder,
    DSJanusVQDecode,
    DSJanusVQEncode,
)
from .understand import DSJanusUnderstand

comfy_services.register_model_folders()

NODE_CLASS_MAPPINGS = {
    "DSJanusModelLoader": DSJanusModelLoader,
    "DSJanusPromptEncoder": DSJanusPromptEncoder,
    "DSJanusCFGPair": DSJanusCFGPair,
    "DSJanusARSampler": DSJanusARSampler,
    "DSJanusVQDecode": DSJanusVQDecode,
    "DSJanusVQEncode": DSJanusVQEncode,
    "DSJanusFlowSampler": DSJanusFlowSampler,
    "DSJanusUnderstand": DSJanusUnderstand,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DSJanusModelLoader": "Janus Model Loader",
    "DSJanusPromptEncoder": "Janus Prompt Encoder",
    "DSJanusCFGPair": "Janus CFG Pair Builder",
    "DSJanusARSampler": "Janus AR Token Sampler",
    "DSJanusVQDecode": "Janus VQ-VAE Decoder",
    "DSJanusVQEncode": "Janus VQ Encode",
    "DSJanusFlowSampler": "JanusFlow ODE Sampler",
    "DSJanusUnderstand": "Janus Image Understanding",
}
