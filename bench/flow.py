"""JanusFlow: our ODE sampler vs the reference demo loop, seconds per step and per 30-step image.

Every step costs about the same (ours also prefills the short prompt in its first step), so a few timed
steps give the per-step median and the 30-step image time is 30 times that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from janus_core.generate_flow import build_flow_cfg, initial_noise, iter_flow_steps
from janus_core.llm import cpu_unpack_layers
from janus_core.model import JanusModel

from .ar import PROMPT
from .measure import PeakRSS, StepClock, Timing, summarize, wait_quiet
from .reference import reference_flow_latents

logger = logging.getLogger(__name__)

IMAGE_STEPS = 30
CFG_WEIGHT = 2.0


@dataclass
class FlowRun:
    impl: str
    parallel: int
    step: Timing
    peak_extra: int

    def image_seconds(self) -> float:
        """Seconds for a 30-step generation of the whole batch."""
        return IMAGE_STEPS * self.step.median


def llm_flops_per_step(model: JanusModel, parallel: int, prompt_len: int, recompute_prompt: bool) -> float:
    """Matmul FLOPs of the LLM in one ODE step (2 per multiply-add; attention included)."""
    spec = model.config.llm
    params = sum(p.numel() for p in model.net.language_model.model.layers.parameters())
    rows = 2 * parallel
    tokens = 1 + 576 + (prompt_len if recompute_prompt else 0)
    context = prompt_len + 577
    attn = 4 * spec.num_hidden_layers * spec.hidden_size * context  # q.k and p.v per token
    return 2.0 * rows * tokens * params + rows * tokens * attn


def run_flow(model: JanusModel, ref_model: JanusModel, parallel: int, steps: int, repeats: int
             ) -> tuple[FlowRun, FlowRun, int]:
    """Time ours (on ``model``) and the reference demo loop (on ``ref_model``, may be the same) at batch
    ``parallel``; returns both and the prompt length."""
    pair = build_flow_cfg(model, PROMPT, parallel, None)
    noise = initial_noise(model, parallel, 0)

    def ours(n: int) -> StepClock:
        model.llm.prepare_weights()  # a one-off per loaded model (the reference may have unpacked a shared one)
        clock = StepClock(cuda=model.device.type == "cuda")
        clock.mark()
        for i, _ in enumerate(iter_flow_steps(model, pair, noise, IMAGE_STEPS, CFG_WEIGHT)):
            clock.mark()
            if i + 1 >= n:
                break
        return clock

    def reference(n: int) -> StepClock:
        cpu_unpack_layers(ref_model.net.language_model)  # before the clock starts (the reference reads plain weights)
        clock = StepClock(cuda=model.device.type == "cuda")
        clock.mark()
        reference_flow_latents(ref_model, pair, noise, n, CFG_WEIGHT, on_step=lambda i: clock.mark())
        return clock

    impls = {"ours": ours, "reference": reference}
    clocks: dict[str, list[StepClock]] = {impl: [] for impl in impls}
    peaks = dict.fromkeys(impls, 0)
    for fn in impls.values():
        fn(1)  # warm-up
    for _ in range(repeats):  # alternate, so slow phases of a shared machine hit both
        for impl, fn in impls.items():
            wait_quiet()
            with PeakRSS() as mem:
                clocks[impl].append(fn(steps))
            peaks[impl] = max(peaks[impl], mem.extra)
    out = {impl: FlowRun(impl, parallel, summarize(clocks[impl]), peaks[impl]) for impl in impls}
    for run in out.values():
        logger.info("flow %s p%d: %.2f s/step", run.impl, parallel, run.step.median)
    return out["ours"], out["reference"], pair.prompt_len
