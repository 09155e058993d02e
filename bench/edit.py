"""Instruction editing (Janus-4o's three guidance rows) against plain text-to-image, per image, in one run.

Editing costs more in two places: the prefill (the input image through SigLIP and the VQ encoder, then ~1.2k prompt
positions x 3 rows instead of ~30 x 2) and every step (3 rows per image instead of 2, each attending ~1.2k more
positions). Both runs use the same model, batch and step window; the 576-step estimate per image is
``(prefill + 576 * step) / batch`` with the step time measured right after the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image

from janus_core.generate_ar import build_cfg_pair
from janus_core.model import JanusModel
from janus_core.prompts import IMAGE_TOKENS

from .ar import PROMPT, time_sampler
from .measure import PeakRSS, Timing, summarize, wait_quiet
from .models import FIXTURES

logger = logging.getLogger(__name__)

INSTRUCTION = "Make the sky purple and add a full moon."
IMAGE = FIXTURES / "images" / "synthetic_200x300.png"


@dataclass
class EditRun:
    """One mode at one batch size: median ``prefill`` seconds, ``step`` timing, peak RSS growth."""

    mode: str
    parallel: int
    prompt_len: int
    prefill: float
    step: Timing
    peak_extra: int

    def image_seconds(self) -> float:
        """Estimated seconds per image for all 576 tokens."""
        return (self.prefill + IMAGE_TOKENS * self.step.median) / self.parallel


def run_edit(model: JanusModel, parallel: int, steps: int, repeats: int) -> tuple[EditRun, EditRun]:
    """Time text-to-image and editing at batch ``parallel`` (``steps`` tokens per run, ``repeats`` runs each,
    alternating); returns ``(text-to-image, editing)``."""
    image = Image.open(IMAGE).convert("RGB")
    pairs = {"text-to-image": build_cfg_pair(model, PROMPT, parallel),
             "editing": build_cfg_pair(model, INSTRUCTION, parallel, image=image)}
    for pair in pairs.values():
        time_sampler(model, pair, 2)  # warm-up
    prefill: dict[str, list[float]] = {mode: [] for mode in pairs}
    clocks: dict[str, list] = {mode: [] for mode in pairs}
    peak = dict.fromkeys(pairs, 0)
    for _ in range(repeats):
        for mode, pair in pairs.items():
            wait_quiet()
            with PeakRSS() as mem:
                t0, clock = time_sampler(model, pair, steps + 1)
            prefill[mode].append(t0)
            clocks[mode].append(clock)
            peak[mode] = max(peak[mode], mem.extra)
    runs = []
    for mode, pair in pairs.items():
        run = EditRun(mode, parallel, pair.prompt_len, sorted(prefill[mode])[len(prefill[mode]) // 2],
                      summarize(clocks[mode]), peak[mode])
        logger.info("%s p%d: prefill %.2f s, %.1f ms/step", mode, parallel, run.prefill, run.step.median * 1e3)
        runs.append(run)
    return runs[0], runs[1]
