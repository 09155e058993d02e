"""Janus Image Understanding node: captions and questions over an IMAGE batch."""

from __future__ import annotations

import torch

from janus_core.images import to_pil_images
from janus_core.sampling import SEED_MAX
from janus_core.understanding import understand, understanding_bytes

from . import comfy_services as comfy
from .loader import JanusModelHandle
from .text_to_image import model_input

MODES = ["per image", "all images in one question"]


class DSJanusUnderstand:
    DESCRIPTION = ("Answers a question about images (or captions them) with any Janus model. 'per image' gives "
                   "one answer per image of the batch; 'all images in one question' shows every image to the "
                   "model at once (DeepSeek's multi-image prompt) and gives one answer.")
    CATEGORY = "Janus"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_NODE = True
    FUNCTION = "answer"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": model_input(),
            "image": ("IMAGE", {"tooltip": "One image or a batch."}),
            "question": ("STRING", {"multiline": True, "default": "Describe this image in detail.",
                                    "tooltip": "What to ask about the image(s)."}),
            "mode": (MODES, {"default": MODES[0], "tooltip": "One answer per image, or one answer about all "
                             "images together."}),
            "max_new_tokens": ("INT", {"default": 512, "min": 1, "max": 4096, "tooltip": "Longest answer, in "
                                       "tokens."}),
            "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "0 = "
                                      "greedy (deterministic, DeepSeek's default); > 0 samples."}),
            "top_p": ("FLOAT", {"default": 0.95, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Nucleus "
                                "sampling cut-off (used when temperature > 0)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": "Sampling seed (answer i uses "
                             "seed + i)."}),
        }}

    def answer(self, model: JanusModelHandle, image: torch.Tensor, question: str, mode: str,
               max_new_tokens: int, temperature: float, top_p: float, seed: int):
        per_image = mode == MODES[0]
        images = to_pil_images(image, model.model.image_processor.background)  # checked before the model loads
        m = model.ready(understanding_bytes(model.model, len(images), question, max_new_tokens, per_image))
        progress = comfy.Progress(max_new_tokens)
        answers = understand(m, images, question, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, per_image=per_image,
                             callback=lambda step, total: progress.update(step))
        progress.update(max_new_tokens)
        return {"ui": {"text": answers}, "result": (answers,)}
