"""Image-token nodes: prompt encoder, CFG pair builder, AR token sampler, VQ encoder and decoder."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from janus_core.errors import JanusError
from janus_core.generate_ar import (
    CFGPair,
    build_cfg_pair,
    decode_bytes,
    decode_image_tokens,
    generate_image_tokens,
    generation_bytes,
    image_token_count,
)
from janus_core.generate_flow import build_flow_cfg
from janus_core.image_tokens import encode_bytes, encode_image_tokens, kept_prefix, pixel_mask_to_tokens
from janus_core.images import images_from_decoded
from janus_core.model import JanusModel
from janus_core.prompts import PromptTokens, encode_prompt, require_ar
from janus_core.sampling import SEED_MAX

from . import comfy_services as comfy
from .loader import JanusModelHandle

PREVIEW_EVERY = 48  # tokens (two rows of the 24x24 grid)
PREVIEW_TIME_BUDGET = 0.1  # previews may take at most this share of the sampling time (VQ decode is slow on CPUs)


@dataclass(frozen=True)
class ImageTokens:
    """``DSJANUS_TOKENS``: VQ ids ``[B, rows * cols]`` (CPU LongTensor), their ``grid``, the producing model, and
    ``image_size`` ``(height, width)`` of the images they stand for (an encoded IMAGE's size, or the decoded size
    of generated tokens): a MASK for them is drawn on an image of that size."""

    tokens: torch.Tensor
    grid: tuple[int, int]
    model_folder: str
    image_size: tuple[int, int]


def generated_tokens(model: JanusModel, tokens: torch.Tensor) -> ImageTokens:
    """``DSJANUS_TOKENS`` of tokens the model generated (their image is the decoded square)."""
    grid = model.config.image_token_grid
    f = model.net.gen_vision_model.downsample_factor
    return ImageTokens(tokens.cpu(), grid, str(model.folder), (grid[0] * f, grid[1] * f))


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
            "text": ("STRING", {"multiline": True, "default": "", "tooltip": "What the image should show (for "
                     "the CFG pair's negative input: what to steer away from; empty = no negative prompt)."}),
        }}

    def encode(self, model: JanusModelHandle, text: str):
        # empty text is allowed here: as the CFG pair's negative it means no negative prompt
        return (encode_prompt(model.model, text, blank_allowed=True),)


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
                "image": ("IMAGE", {"tooltip": "Optional image to edit (one image; Janus / Janus-Pro models, best "
                                    "Janus-4o-7B): the positive prompt becomes the edit instruction and every image "
                                    "of the batch is an edit of this one (three guidance rows, see the AR sampler's "
                                    "image_cfg_weight)."}),
            },
        }

    def build(self, model: JanusModelHandle, positive: PromptTokens, batch_size: int,
              negative: PromptTokens | None = None, image: torch.Tensor | None = None):
        m = model.model
        if image is not None:
            require_ar(m, "Instruction editing (the CFG pair's image input)")
        if m.is_flow:
            return (build_flow_cfg(m, positive, batch_size, negative),)
        return (build_cfg_pair(m, positive, batch_size, negative, image),)


def partial_grid_preview(model: JanusModel, tokens: torch.Tensor) -> Image.Image | None:
    """Decode the complete rows of image 0 so far into a preview of the full image size (grey below), or None."""
    grid_rows, cols = model.config.image_token_grid
    rows = tokens.shape[1] // cols
    if rows == 0:
        return None
    vq = model.net.gen_vision_model
    codes = tokens[:1, : rows * cols].to(vq.post_quant_conv.weight.device)
    with torch.inference_mode():
        image = images_from_decoded(vq.decode_code(codes, (rows, cols)))[0]
    f = vq.downsample_factor
    canvas = Image.new("RGB", (cols * f, grid_rows * f), (127, 127, 127))
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


def token_mask_of(model: JanusModel, init_tokens: ImageTokens | None, mask: torch.Tensor | None
                  ) -> torch.Tensor | None:
    """The AR sampler's token mask (bool ``[B', rows * cols]``) from its optional init tokens and MASK, checked."""
    if init_tokens is None and mask is None:
        return None
    if init_tokens is None:
        raise JanusError("The mask needs init_tokens: connect Janus VQ Encode of the image the mask was drawn on "
                         "(the mask says which of its tokens to regenerate).")
    if init_tokens.model_folder != str(model.folder):
        raise JanusError(f"These init tokens come from {init_tokens.model_folder}; encode the image with the model "
                         f"you sample with ({model.folder}): each model has its own VQ codebook.")
    if mask is None:
        raise JanusError("init_tokens need a MASK saying which tokens to regenerate (white = regenerate), e.g. Load "
                         "Image's mask painted in the mask editor; to keep every token, decode the tokens directly.")
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise JanusError(f"The mask must be a MASK [B, H, W], got {got}.")
    height, width = init_tokens.image_size
    if tuple(mask.shape[-2:]) != (height, width):
        raise JanusError(
            f"The mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the init tokens stand for a {width}x{height} "
            "image; use a mask of that image (e.g. the mask output of the Load Image that fed Janus VQ Encode). Load "
            "Image gives an empty 64x64 mask for a file without transparency: paint one in the mask editor.")
    rows, cols = model.config.image_token_grid
    return pixel_mask_to_tokens(model, mask).reshape(-1, rows * cols)


class DSJanusARSampler:
    DESCRIPTION = ("Generates the 576 image tokens of each image autoregressively with classifier-free "
                   "guidance (Janus-1.3B / Janus-Pro / Janus-4o). With a CFG pair built with an image it edits "
                   "that image; with init_tokens and a mask it regenerates only the masked part (inpainting, "
                   "outpainting, variations). Decode the tokens with Janus VQ-VAE Decoder.")
    CATEGORY = "Janus"
    RETURN_TYPES = ("DSJANUS_TOKENS",)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
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
            },
            # optional, first: API prompts saved before editing existed still run; the widget order is unchanged
            "optional": {
                "image_cfg_weight": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                                               "Only when the CFG pair was built with an image (editing): weight w2 "
                                               "of the row that sees the image's features but not its tokens, cond "
                                               "= (full + w2 * part) / (1 + w2). Lower stays closer to the input "
                                               "image, higher follows the instruction more freely."}),
                "init_tokens": ("DSJANUS_TOKENS", {"tooltip": "Tokens to start from (Janus VQ Encode of an image, "
                                                   "or an earlier sampler run, same model): kept where the mask is "
                                                   "0, regenerated where it is 1. Needs the mask."}),
                "mask": ("MASK", {"tooltip": "Where to regenerate init_tokens (1 = regenerate), in the pixels of the "
                                  "image they came from (e.g. Load Image's mask). It is fitted like the image (long "
                                  "side to 384, centred, padding kept) and each 16x16-pixel token is regenerated "
                                  "when any mask pixel >= 0.5 falls into it. Resampled tokens follow the kept ones in "
                                  "raster order: masking the lower rows outpaints downwards."}),
            },
        }

    def sample(self, model: JanusModelHandle, cfg_pair: CFGPair, seed: int, cfg_weight: float,
               temperature: float, top_k: int, top_p: float, image_cfg_weight: float = 5.0,
               init_tokens: ImageTokens | None = None, mask: torch.Tensor | None = None):
        if not isinstance(cfg_pair, CFGPair):
            raise JanusError("This CFG pair was built for a JanusFlow model; the AR sampler needs one built with "
                             "a Janus / Janus-Pro model.")
        require_ar(model.model)
        resample = token_mask_of(model.model, init_tokens, mask)
        kept = 0 if resample is None else kept_prefix(resample)
        m = model.ready(generation_bytes(model.model, cfg_pair, kept))
        total = image_token_count(m)
        progress = comfy.Progress(total)
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
                                       top_k=top_k, top_p=top_p, callback=on_token, image_cfg_weight=image_cfg_weight,
                                       init_tokens=None if init_tokens is None else init_tokens.tokens, mask=resample)
        return (generated_tokens(m, tokens),)


class DSJanusVQEncode:
    DESCRIPTION = ("Encodes images into Janus VQ tokens with the model's VQ tokenizer, after the model's image "
                   "preprocessing (long side to 384, padded to a square with grey). Give them to the AR sampler's "
                   "init_tokens with a mask to inpaint, outpaint or vary the image (any Janus / Janus-Pro model).")
    CATEGORY = "Janus"
    RETURN_TYPES = ("DSJANUS_TOKENS",)
    RETURN_NAMES = ("tokens",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input("A Janus / Janus-Pro model (its VQ tokenizer; not JanusFlow)."),
            "image": ("IMAGE", {"tooltip": "Images to encode (a batch gives one token row per image)."}),
        }}

    def encode(self, model: JanusModelHandle, image: torch.Tensor):
        require_ar(model.model, "VQ encoding")
        count = image.shape[0] if isinstance(image, torch.Tensor) and image.dim() == 4 else 1
        m = model.ready(encode_bytes(model.model, count))
        tokens = encode_image_tokens(m, image, comfy.Progress(count).update_count)
        return (ImageTokens(tokens, m.config.image_token_grid, str(m.folder), tuple(image.shape[1:3])),)


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
            "tokens": ("DSJANUS_TOKENS", {"tooltip": "From Janus AR Token Sampler (or Janus VQ Encode)."}),
        }}

    def decode(self, model: JanusModelHandle, tokens: ImageTokens):
        require_ar(model.model)
        m = model.ready(decode_bytes(model.model, tokens.tokens.shape[0]))
        if tokens.model_folder != str(m.folder):
            raise JanusError(f"These tokens come from {tokens.model_folder}; decode them with that model, not "
                             f"{m.folder} (each model has its own VQ codebook).")
        count = tokens.tokens.shape[0]
        return (decode_image_tokens(m, tokens.tokens, comfy.Progress(count).update_count),)
