"""Text-to-image nodes: prompt encoder, CFG pair builder, AR token sampler, VQ decoder."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from janus_core.errors import JanusError
from janus_core.generate_ar import (
    TOKEN_GRID,
    CFGPair,
    build_cfg_pair,
    decode_bytes,
    decode_image_tokens,
    generate_image_tokens,
    generation_bytes,
)
from janus_core.generate_flow import build_flow_cfg
from janus_core.images import images_from_decoded
from janus_core.prompts import IMAGE_TOKENS, PromptTokens, encode_prompt
from janus_core.sampling import SEED_MAX

from . import comfy_services as comfy
from .loader import JanusModelHandle

PREVIEW_EVERY = 48  # tokens (two rows of the 24x24 grid)
PREVIEW_TIME_BUDGET = 0.1  # previews may take at most this share of the sampling time (VQ decode is slow on CPUs)


@dataclass(frozen=True)
class ImageTokens:
    """``DSJANUS_TOKENS``: VQ ids ``[B, 576]`` (CPU LongTensor), their ``grid`` and the producing model."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    model_folder: str


def model_input(tooltip: str = "A model from Janus Model Loader.") -> tuple:
    return ("DSJANUS_MODEL", {"tooltip": tooltip})


class DSJanusPromptEncoder:
    DESCRIPTION = ("Formats a text-to-image prompt with the model's chat template (its own role strings, empty "
                   "system prompt, then <begin_of_image>) and tokenises it.")
    CATEGORY = "Janus"
    RETURN_TYPES = ("DSJANUS_PROMPT",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "text": ("STRING", {"multiline": True, "default": "", "tooltip": "What the image should show."}),
        }}

    def encode(self, model: JanusModelHandle, text: str):
        return (encode_prompt(model.model, text),)


class DSJanusCFGPair:
    DESCRIPTION = ("Builds the conditional / unconditional rows for classifier-free guidance, for batch_size "
                   "images. Without a negative prompt the unconditional row is DeepSeek's (prompt replaced by "
                   "padding); with one, the negative prompt steers away from what it describes.")
    CATEGORY = "Janus"
    RETURN_TYPES = ("DSJANUS_CFG",)
    RETURN_NAMES = ("cfg_pair",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "positive": ("DSJANUS_PROMPT", {"tooltip": "The prompt from Janus Prompt Encoder."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images generated at once "
                                       "(each with seed + index)."}),
            },
            "optional": {
                "negative": ("DSJANUS_PROMPT", {"tooltip": "Optional negative prompt (same model)."}),
            },
        }

    def build(self, model: JanusModelHandle, positive: PromptTokens, batch_size: int,
              negative: PromptTokens | None = None):
        m = model.model
        if m.is_flow:
            return (build_flow_cfg(m, positive.text, batch_size, negative.text if negative else None),)
        return (build_cfg_pair(m, positive, batch_size, negative),)


def partial_grid_preview(model, tokens: torch.Tensor) -> Image.Image | None:
    """Decode the complete rows of image 0 so far into a 384x384 preview (grey below), or None."""
    rows = tokens.shape[1] // TOKEN_GRID[1]
    if rows == 0:
        return None
    vq = model.net.gen_vision_model
    codes = tokens[:1, : rows * TOKEN_GRID[1]].to(vq.post_quant_conv.weight.device)
    with torch.inference_mode():
        image = images_from_decoded(vq.decode_code(codes, (rows, TOKEN_GRID[1])))[0]
    side = TOKEN_GRID[1] * 16
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(Image.fromarray((image * 255).to(torch.uint8).numpy()), (0, 0))
    return canvas


class PreviewSchedule:
    """When to send a partial-grid preview: every :data:`PREVIEW_EVERY` tokens at most, and only while the
    previews' decode time stays within :data:`PREVIEW_TIME_BUDGET` of the sampling time (a GPU decodes a preview
    in milliseconds and gets one every two rows; a CPU gets fewer)."""

    def __init__(self) -> None:
        self.last_step = 0
        self.cost = 0.0
        self.since = time.perf_counter()

    def due(self, done: int) -> bool:
        if done - self.last_step < PREVIEW_EVERY:
            return False
        return (time.perf_counter() - self.since) * PREVIEW_TIME_BUDGET >= self.cost

    def record(self, done: int, started: float) -> None:
        self.last_step, self.since = done, time.perf_counter()
        self.cost = self.since - started


class DSJanusARSampler:
    DESCRIPTION = ("Generates the 576 image tokens of each image autoregressively with classifier-free "
                   "guidance (Janus-1.3B / Janus-Pro). Decode them with Janus VQ-VAE Decoder.")
    CATEGORY = "Janus"
    RETURN_TYPES = ("DSJANUS_TOKENS",)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "cfg_pair": ("DSJANUS_CFG", {"tooltip": "From Janus CFG Pair Builder (same model)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": "Image i of the batch uses "
                             "seed + i (mod 2^64), so it can be regenerated alone."}),
            "cfg_weight": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Guidance "
                                     "strength: logits = uncond + w * (cond - uncond). 1 = no guidance."}),
            "temperature": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip": "Sampling "
                                      "temperature (> 0; 0 only with top_k = 1)."}),
            "top_k": ("INT", {"default": 0, "min": 0, "max": 16384, "tooltip": "Keep the k most likely tokens "
                              "(0 = off, 1 = greedy)."}),
            "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Nucleus "
                                "sampling: keep the smallest set reaching this probability (1 = off)."}),
        }}

    def sample(self, model: JanusModelHandle, cfg_pair: CFGPair, seed: int, cfg_weight: float,
               temperature: float, top_k: int, top_p: float):
        if not isinstance(cfg_pair, CFGPair):
            raise JanusError("This CFG pair was built for a JanusFlow model; the AR sampler needs one built with "
                             "a Janus / Janus-Pro model.")
        m = model.ready(generation_bytes(model.model, cfg_pair))
        progress = comfy.Progress(IMAGE_TOKENS)
        schedule = PreviewSchedule() if comfy.previews_enabled() else None

        def on_token(step: int, total: int, tokens: torch.Tensor) -> None:
            done = step + 1
            preview = None
            if schedule is not None and done < total and schedule.due(done):
                started = time.perf_counter()
                preview = partial_grid_preview(m, tokens)
                schedule.record(done, started)
            progress.update(done, preview)

        tokens = generate_image_tokens(m, cfg_pair, seed=seed, cfg_weight=cfg_weight, temperature=temperature,
                                       top_k=top_k, top_p=top_p, callback=on_token)
        return (ImageTokens(tokens.cpu(), TOKEN_GRID, str(m.folder)),)


class DSJanusVQDecode:
    DESCRIPTION = "Decodes Janus image tokens into images (384x384) with the model's VQ-16 decoder."
    CATEGORY = "Janus"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input("The model that generated the tokens."),
            "tokens": ("DSJANUS_TOKENS", {"tooltip": "From Janus AR Token Sampler."}),
        }}

    def decode(self, model: JanusModelHandle, tokens: ImageTokens):
        m = model.ready(decode_bytes(model.model, tokens.tokens.shape[0]))
        if tokens.model_folder != str(m.folder):
            raise JanusError(f"These tokens come from {tokens.model_folder}; decode them with that model, not "
                             f"{m.folder} (each model has its own VQ codebook).")
        return (decode_image_tokens(m, tokens.tokens),)
