"""AR text-to-image: our sampler vs the reference loop, step times, per-image time, floor and memory.

A generation is 576 steps whose cost grows linearly with the position (every row's KV cache is read, and
the reference's growing cache is also copied). With ``steps < 576`` two windows of ``steps`` steps are
timed, one right after the prompt (*early*) and one ending at the last image token (*late*), and the
576-step total is ``prefill + 576 * (early + late) / 2`` (exact for a cost linear in the position). The
late window of our sampler runs on a prompt lengthened by ``576 - steps`` tokens (one 2-row prefill); the
reference's starts from a transformers cache pre-filled with zeros of that length (prefilling ``2B`` rows
of ~600 tokens would take minutes and does not change a step's cost).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass

import torch

from janus_core.generate_ar import CFGPair, build_cfg_pair, generate_image_tokens
from janus_core.llm import cpu_unpack_layers
from janus_core.model import JanusModel
from janus_core.prompts import IMAGE_TOKENS

from .measure import PeakRSS, StepClock, Timing, summarize, wait_quiet
from .reference import reference_ar_tokens

logger = logging.getLogger(__name__)

PROMPT = "A close-up photo of a red fox sitting in fresh snow at sunrise, soft light, highly detailed fur."


class _Enough(Exception):
    """Raised from the token callback to stop a timed window early."""


@dataclass
class ARRun:
    """Timings of one implementation at one batch size: ``early`` / ``late`` step medians, ``prefill`` s."""

    impl: str
    parallel: int
    prefill: float
    early: Timing
    late: Timing | None
    peak_extra: int

    def batch_seconds(self) -> float:
        """Estimated seconds for all 576 tokens of the batch."""
        late = self.early.median if self.late is None else self.late.median
        return self.prefill + IMAGE_TOKENS * (self.early.median + late) / 2


def weight_bytes_per_step(model: JanusModel) -> int:
    """Bytes of the weights one AR step reads: decoder layers, final norm, gen head and gen aligner."""
    net = model.net
    mods = [net.language_model.model.layers, net.language_model.model.norm, net.gen_head, net.gen_aligner]
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


def kv_bytes_per_position(model: JanusModel) -> int:
    """Bytes of keys + values one row stores per position (all layers)."""
    spec = model.config.llm
    return 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * model.dtype.itemsize


def floor_seconds(model: JanusModel, parallel: int, prompt_len: int, bandwidth: float) -> tuple[float, float]:
    """(first-step floor, 576-step floor) in seconds: weights + every row's KV read once per step."""
    w = weight_bytes_per_step(model)
    kv = kv_bytes_per_position(model) * 2 * parallel
    per_step = [(w + kv * (prompt_len + s)) / (bandwidth * 1e9) for s in range(IMAGE_TOKENS)]
    return per_step[0], sum(per_step)


def long_pair(model: JanusModel, pair: CFGPair, extra: int) -> CFGPair:
    """``pair`` with ``extra`` more prompt tokens (repeats of its text), for the late window."""
    body = pair.cond_ids[1:-1]
    filler = body.repeat(extra // max(body.numel(), 1) + 1)[:extra]
    cond = torch.cat([pair.cond_ids[:-1], filler, pair.cond_ids[-1:]])
    uncond = cond.clone()
    uncond[1:-1] = model.tokenizer.pad_id
    return CFGPair(cond, uncond, pair.batch_size, pair.variant, pair.model_folder)


def time_sampler(model: JanusModel, pair: CFGPair, steps: int) -> tuple[float, StepClock]:
    """Run our sampler for ``steps`` tokens: (seconds to the first token, the clock marked after each token).
    The weights are packed for the CPU's matmul first (a one-off per loaded model, not part of a generation)."""
    model.llm.prepare_weights()
    clock = StepClock(cuda=model.device.type == "cuda")
    start = time.perf_counter()
    first: list[float] = []

    def on_token(step: int, total: int, tokens: torch.Tensor) -> None:
        if not first:
            first.append(time.perf_counter() - start)
        clock.mark()
        if len(clock) >= steps:
            raise _Enough

    try:
        generate_image_tokens(model, pair, seed=0, callback=on_token)
    except _Enough:
        pass
    return first[0], clock


def _zero_cache(model: JanusModel, rows: int, length: int) -> object:
    from transformers import DynamicCache

    lm = model.net.language_model.model
    spec = model.config.llm
    # transformers 5 sizes its cache layers from the config; 4.x takes no arguments
    takes_config = "config" in inspect.signature(DynamicCache.__init__).parameters
    cache = DynamicCache(config=lm.config) if takes_config else DynamicCache()
    shape = (rows, spec.num_key_value_heads, length, spec.head_dim)
    for i in range(spec.num_hidden_layers):
        zeros = torch.zeros(shape, dtype=model.dtype, device=model.device)
        cache.update(zeros, zeros.clone(), i)
    return cache


def _reference(model: JanusModel, pair: CFGPair, steps: int, late_len: int | None) -> tuple[float, StepClock]:
    cpu_unpack_layers(model.net.language_model)  # before the clock starts (the reference reads plain weights)
    clock = StepClock(cuda=model.device.type == "cuda")
    start = time.perf_counter()
    first: list[float] = []
    past = None if late_len is None else _zero_cache(model, 2 * pair.batch_size, late_len)

    def on_step(i: int) -> None:
        if not first:
            first.append(time.perf_counter() - start)
        clock.mark()

    reference_ar_tokens(model, pair, steps=steps + 1, past=past, on_step=on_step)
    return first[0], clock


def run_ar(model: JanusModel, ref_model: JanusModel, parallel: int, steps: int, repeats: int
           ) -> tuple[ARRun, ARRun, int]:
    """Time ours (on ``model``) and the reference (on ``ref_model``, may be the same) at batch ``parallel``;
    returns both runs and the prompt length."""
    pair = build_cfg_pair(model, PROMPT, parallel)
    prompt_len = pair.cond_ids.numel()
    full = steps >= IMAGE_TOKENS
    n = IMAGE_TOKENS - 1 if full else steps
    late_extra = IMAGE_TOKENS - 1 - n
    late_pair = long_pair(model, pair, late_extra)
    time_sampler(model, pair, 2)  # warm-up (allocator, rope tables, weight fusion)
    _reference(ref_model, pair, 2, None)

    def window(impl: str, late: bool) -> tuple[float, StepClock, int]:
        wait_quiet()
        with PeakRSS() as mem:
            if impl == "ours":
                t0, clock = time_sampler(model, late_pair if late else pair, n + 1)
            else:
                t0, clock = _reference(ref_model, pair, n, prompt_len + late_extra if late else None)
        return t0, clock, mem.extra

    impls = ("ours", "reference")
    early = {i: [] for i in impls}
    late = {i: [] for i in impls}
    prefill = {i: [] for i in impls}
    peak = dict.fromkeys(impls, 0)
    for _ in range(repeats):  # alternate, so slow phases of a shared machine hit both
        for impl in impls:
            for is_late in (False,) if full else (False, True):
                t0, clock, extra = window(impl, is_late)
                (late if is_late else early)[impl].append(clock)
                if not is_late:
                    prefill[impl].append(t0)
                peak[impl] = max(peak[impl], extra)
    results = {}
    for impl in impls:
        results[impl] = ARRun(impl, parallel, sorted(prefill[impl])[len(prefill[impl]) // 2],
                              summarize(early[impl]), summarize(late[impl]) if late[impl] else None, peak[impl])
        logger.info("%s p%d: early %.1f ms/step%s", impl, parallel, results[impl].early.median * 1e3,
                    "" if full else f", late {results[impl].late.median * 1e3:.1f} ms/step")
    return results["ours"], results["reference"], prompt_len
