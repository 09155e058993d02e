"""VQ decoding time and image-understanding speed (prefill seconds, decoded tokens per second)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from janus_core.generate_ar import decode_image_tokens
from janus_core.model import JanusModel
from janus_core.prompts import IMAGE_TOKENS
from janus_core.understanding import understand

from .measure import StepClock, Timing, summarize, time_repeated, wait_quiet
from .models import FIXTURES

QUESTION = "Describe this image in detail."


def vq_decode_seconds(model: JanusModel, batch: int = 1, repeats: int = 3) -> Timing:
    """Seconds to decode ``batch`` random token grids to 384x384 images."""
    codes = torch.randint(0, model.config.vq.codebook_size, (batch, IMAGE_TOKENS), generator=torch.Generator())
    wait_quiet()
    return time_repeated(lambda: decode_image_tokens(model, codes), repeats)


@dataclass
class UnderstandRun:
    prefill: float  # seconds from the call to the first answer token (vision tower + prompt prefill)
    token: Timing  # seconds per further token
    tokens: int


def understanding_speed(model: JanusModel, new_tokens: int = 24) -> UnderstandRun:
    """Greedy answer about the fixture image: prefill seconds and per-token time."""
    image = Image.open(FIXTURES / "images" / "synthetic_200x300.png").convert("RGB")
    clock = StepClock()
    understand(model, [image], QUESTION, max_new_tokens=2)  # warm-up (packs the weights for the CPU's matmul)
    wait_quiet()
    start = time.perf_counter()
    first: list[float] = []

    def on_token(step: int, total: int) -> None:
        if not first:
            first.append(time.perf_counter() - start)
        clock.mark()

    understand(model, [image], QUESTION, max_new_tokens=new_tokens, callback=on_token)
    return UnderstandRun(first[0], summarize([clock]), len(clock) + 1)
