"""Janus / Janus-Pro image generation: the token loop (text-to-image, instruction editing, inpainting with init
tokens), scoring of given tokens, and VQ decoding.

The guidance rows (:mod:`janus_core.guidance`: 2 per image, 3 when editing) are prefilled once for the whole
batch into a preallocated KV cache (:func:`prefill.prefill_rows`); each step then feeds the chosen token of
every image to all its rows through ``gen_aligner(gen_embed(token))`` and mixes the gen head's logits of the
rows (:func:`guidance.guide`). The reference feeds the same tokens one step at a time from a cache that grows.

Init tokens and a mask (True = resample, :mod:`janus_core.image_tokens`) keep the unmasked tokens (fed as if
they had been drawn: teacher-forced) and sample the masked ones, still in raster order, so resampled tokens
see every kept token above and to the left of them. The leading positions every image keeps are fed as one
block after the prompt (an outpainting downwards or a variation that keeps the top rows costs one forward
for them, not one step per token).

Seeds: image ``i`` draws with its own generator seeded ``seed + i`` (mod 2**64), once per position it
resamples and never at a kept position. So image ``i`` depends only on its own prompt rows, init tokens, mask and
seed: it equals a batch of one with seed ``seed + i``, and a mask that resamples everything gives plain
generation whatever the init tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator

import torch

from .errors import JanusError
from .guidance import CFGPair, build_cfg_pair, check_pair_model, guide, row_embeds
from .image_tokens import check_init_tokens, encode_bytes, kept_prefix, vq_dtype
from .images import ImagesArg, images_from_decoded
from .llm import forward_bytes, kv_cache_bytes
from .memory import Progress, check_fits, fitting_chunks
from .model import JanusModel
from .modules.siglip import vit_activation_bytes
from .modules.vq import decoder_activation_bytes
from .prefill import positions_of, prefill_rows
from .prompts import PromptTokens, require_ar
from .sampling import (
    GENERATOR_BYTES,
    SAMPLING_BYTES_PER_LOGIT,
    check_guidance_weight,
    check_sampling_args,
    check_seed,
    row_generators,
    sample_next,
)

logger = logging.getLogger(__name__)

TokenCallback = Callable[[int, int, torch.Tensor], None]
StepStream = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, None]


def image_token_count(model: JanusModel) -> int:
    """Tokens of one image: rows x columns of the model's VQ token grid (576 for the releases)."""
    rows, cols = model.config.image_token_grid
    return rows * cols


def _check_weights(cfg_weight: object, image_cfg_weight: object) -> tuple[float, float]:
    return (check_guidance_weight(cfg_weight),
            check_guidance_weight(image_cfg_weight, "image_cfg_weight",
                                  "0 = the input image's tokens weigh fully, larger = more freedom from them"))


def _resolve_pair(model: JanusModel, prompt: str | PromptTokens | CFGPair, batch_size: int,
                  negative_prompt: str | None, image: ImagesArg | None) -> CFGPair:
    """``prompt`` as a checked CFG pair (built for ``batch_size`` images unless it is one already)."""
    if not isinstance(prompt, CFGPair):
        return build_cfg_pair(model, prompt, batch_size, negative_prompt, image)
    check_pair_model(model, prompt, "CFG pair")
    if image is not None:
        raise JanusError("A CFG pair already fixes its rows; to edit an image, pass it to build_cfg_pair (or the "
                         "CFG Pair Builder's image input) instead.")
    return prompt


class PrefilledRows:
    """The language model's state for one batch: the pair's distinct rows prefilled once and copied to ``copies``
    images (kind-major rows: all images' first row, then all second rows, ...), with room for ``extra`` tokens.

    ``hidden [R * copies, hidden]`` holds the last position's final-norm output; :meth:`feed` appends tokens.
    """

    def __init__(self, model: JanusModel, pair: CFGPair, copies: int, extra: int):
        self.model, self.rows = model, pair.num_rows
        embeds, valid = row_embeds(model, pair)
        positions = positions_of(valid)
        padded = not bool(valid.all())
        self.cache, hidden = prefill_rows(model.llm, embeds, embeds.shape[1] + extra, copies,
                                          valid if padded else None, positions)
        source = torch.arange(self.rows, device=embeds.device).repeat_interleave(copies)
        self.hidden = hidden[:, -1][source]
        self.next_positions = (positions[:, -1] + 1)[source].unsqueeze(1)  # [R * copies, 1]

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append image tokens ``[copies, k]`` to every row of their image; returns the hidden states
        ``[R * copies, k, hidden]`` (row ``r * copies + i`` is row ``r`` of image ``i``)."""
        k = tokens.shape[1]
        # embedded per row (not once per image, then copied): never a single-row matmul, which CPU bf16 kernels
        # round differently from several rows, so image i of a batch stays equal to a batch of one
        embeds = self.model.net.image_token_embeds(tokens.repeat(self.rows, 1))
        steps = torch.arange(k, device=self.next_positions.device)
        hidden = self.model.llm.forward(embeds, self.cache, self.next_positions + steps)
        self.next_positions = self.next_positions + k
        return hidden


def cfg_logit_steps(model: JanusModel, pair: CFGPair) -> StepStream:
    """The AR loop without sampling: yields ``(hidden [R * B, H], gen-head logits [R * B, V])`` per position.

    Rows are kind-major (``[0, B)`` cond / full, then part when editing, uncond last; :func:`guidance.guide` mixes
    them). Send the chosen tokens ``[B]`` (or a block ``[B, k]`` of the next positions) to get the logits after
    them; the first yield is the prefill (logits at ``<begin_of_image>``). The stream ends once a whole image's
    tokens were sent.
    """
    total = image_token_count(model)
    rows = PrefilledRows(model, pair, pair.batch_size, total)
    hidden, done = rows.hidden, 0
    while True:
        chosen = yield hidden, model.net.gen_head(hidden)
        chosen = chosen[:, None] if chosen.dim() == 1 else chosen
        done += chosen.shape[1]
        if done >= total:
            return
        hidden = rows.feed(chosen)[:, -1]


def edit_image_bytes(model: JanusModel) -> int:
    """Peak bytes an editing pair's input image takes on the model's device before the prefill: its pixels, the
    SigLIP tower and aligner, or the VQ encoder (one after the other)."""
    spec, vit, dtype = model.config.llm, model.config.siglip, model.dtype
    patches = model.config.num_image_tokens
    vision = (3 * vit.image_size ** 2 * (4 + dtype.itemsize)
              + vit_activation_bytes(vit.width, vit.mlp_ratio, vit.num_patches, 1, dtype)
              + 3 * patches * spec.hidden_size * dtype.itemsize)
    return max(vision, encode_bytes(model, 1))


def _prompt_bytes(model: JanusModel, pair: CFGPair) -> int:
    """Prefill of the pair's distinct rows: their embeddings (and padded copy), cache and forward."""
    spec, dtype, device = model.config.llm, model.dtype, model.device
    rows, length = pair.num_rows, pair.prompt_len
    embeds = 2 * rows * length * spec.hidden_size * dtype.itemsize
    return embeds + kv_cache_bytes(spec, rows, length, dtype) + forward_bytes(spec, rows, length, length, dtype, device)


def _head_bytes(model: JanusModel, rows: int) -> int:
    """The gen head on ``rows`` hidden vectors: its input in the head's dtype, the MLP's two activations, logits."""
    head = model.net.gen_head
    size = head.vision_head.weight.dtype.itemsize
    embed, vocab = head.output_mlp_projector.out_features, head.vision_head.out_features
    return rows * (model.config.llm.hidden_size * (model.dtype.itemsize + size) + 2 * embed * size + vocab * size)


def generation_bytes(model: JanusModel, pair: CFGPair, block: int = 1) -> int:
    """Peak bytes :func:`generate_image_tokens` allocates on the model's device for ``pair`` (beyond the weights).

    The KV cache of ``R * B`` rows x (prompt + 576) positions and the tokens (with init tokens and mask), plus the
    larger of the prefill of the ``R`` distinct rows and a step: the forward of ``R * B`` rows over ``block`` new
    positions (``block`` > 1: the leading tokens every image keeps, fed at once), the gen head's activations and
    logits, mixing and sampling in float32. An editing pair's input image goes first (:func:`edit_image_bytes`).
    """
    spec, dtype, device = model.config.llm, model.dtype, model.device
    b, total = pair.batch_size, image_token_count(model)
    rows, context = pair.num_rows * b, pair.prompt_len + total
    vocab = model.net.gen_head.vision_head.out_features

    def step(tokens: int) -> int:
        return (rows * tokens * spec.hidden_size * dtype.itemsize + forward_bytes(spec, rows, tokens, context, dtype,
                                                                                   device)
                + _head_bytes(model, rows) + b * vocab * SAMPLING_BYTES_PER_LOGIT)

    held = kv_cache_bytes(spec, rows, context, dtype) + b * (total * 3 * 9 + GENERATOR_BYTES)
    run = held + max(_prompt_bytes(model, pair), step(1), step(block))
    return max(run, edit_image_bytes(model)) if pair.is_edit else run


def scoring_bytes(model: JanusModel, pair: CFGPair, batch: int, length: int) -> int:
    """Peak bytes :func:`score_image_tokens` allocates on the model's device for ``batch`` x ``length`` tokens.

    The KV cache of ``R * batch`` rows x (prompt + ``length``), then the larger of the prefill and the forward over
    the tokens with the gen head on every position, its logits (``[R * batch, length, V]``) mixed in float32
    into the ``[batch, length, V]`` result.
    """
    spec, dtype, device = model.config.llm, model.dtype, model.device
    rows, context = pair.num_rows * batch, pair.prompt_len + length
    vocab = model.net.gen_head.vision_head.out_features
    head = model.net.gen_head.vision_head.weight.dtype.itemsize
    forward = rows * length * spec.hidden_size * dtype.itemsize + forward_bytes(spec, rows, length, context, dtype,
                                                                                 device)
    as_float = 0 if head == 4 else rows * length * vocab * 4  # the logits cast to float32 for mixing
    logits = _head_bytes(model, rows * length) + as_float + 2 * batch * length * vocab * 4  # the mix and its result
    run = kv_cache_bytes(spec, rows, context, dtype) + max(_prompt_bytes(model, pair), forward + logits)
    return max(run, edit_image_bytes(model)) if pair.is_edit else run


def _check_tokens(model: JanusModel, tokens: object) -> torch.Tensor:
    """``tokens [B, T]`` (integer VQ ids of this model, ``1 <= T <=`` a whole image) as a LongTensor."""
    total, vocab = image_token_count(model), model.config.vq.codebook_size
    if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not 1 <= tokens.shape[1] <= total
            or tokens.shape[0] == 0 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool):
        got = f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise JanusError(f"Expected image tokens as an integer tensor [B, T] with 1 <= T <= {total}, got {got}.")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise JanusError(f"The tokens hold ids from {int(tokens.min())} to {int(tokens.max())}, but this model's VQ "
                         f"codebook has {vocab} entries: they belong to another model.")
    return tokens.long()


@torch.inference_mode()
def score_image_tokens(model: JanusModel, prompt: str | PromptTokens | CFGPair, tokens: torch.Tensor,
                       cfg_weight: float = 5.0, negative_prompt: str | None = None, image: ImagesArg | None = None,
                       image_cfg_weight: float = 5.0) -> torch.Tensor:
    """The guided logits ``[B, T, V]`` (float32) that token ``t`` of each row of ``tokens [B, T]`` is drawn from,
    given ``tokens[:, :t]``: what :func:`generate_image_tokens` samples from at position ``t`` (before
    temperature, top-k and top-p). ``log_softmax(...).gather(tokens)`` summed over ``t`` ranks candidates by
    likelihood.

    One prefill of the prompt rows plus one forward over the tokens (not one step per token). Arguments as in
    :func:`generate_image_tokens`; a CFG pair must be built for ``B`` images. Refused with a :class:`JanusError`
    when :func:`scoring_bytes` does not fit the device's free memory.
    """
    require_ar(model)
    cfg_weight, image_cfg_weight = _check_weights(cfg_weight, image_cfg_weight)
    tokens = _check_tokens(model, tokens).to(model.device)
    batch, length = tokens.shape
    pair = _resolve_pair(model, prompt, batch, negative_prompt, image)
    if pair.batch_size != batch:
        raise JanusError(f"The CFG pair is built for {pair.batch_size} images but {batch} rows of tokens were given; "
                         "build it with batch_size equal to the number of rows.")
    check_fits(model.device, scoring_bytes(model, pair, batch, length), "Image token scoring", batch)
    rows = PrefilledRows(model, pair, batch, length)
    hidden = [rows.hidden[:, None]]
    if length > 1:
        hidden.append(rows.feed(tokens[:, :-1]))
    return guide(model.net.gen_head(torch.cat(hidden, dim=1)), pair.num_rows, cfg_weight, image_cfg_weight)


def _draw(logits: torch.Tensor, generators: list[torch.Generator] | None, sampling: tuple[float, int, float],
          kept: torch.Tensor | None, resample: torch.Tensor | None) -> torch.Tensor:
    """Tokens ``[B]`` for one position: drawn from ``logits [B, V]`` where ``resample [B]`` (default: every row;
    only those rows' generators draw), ``kept [B]`` elsewhere."""
    if resample is None or bool(resample.all()):
        return sample_next(logits, generators, *sampling)
    chosen = kept.clone()
    rows = resample.nonzero()[:, 0]
    if rows.numel():
        gens = None if generators is None else [generators[i] for i in rows.tolist()]
        chosen[rows] = sample_next(logits[rows], gens, *sampling)
    return chosen


@torch.inference_mode()
def generate_image_tokens(model: JanusModel, prompt: str | PromptTokens | CFGPair, batch_size: int = 1,
                          seed: int = 0, cfg_weight: float = 5.0, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, negative_prompt: str | None = None,
                          callback: TokenCallback | None = None, image: ImagesArg | None = None,
                          image_cfg_weight: float = 5.0, init_tokens: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``[B, 576]`` VQ token ids (LongTensor on the model's device, raster order over the 24x24 grid).

    ``prompt`` is text, a :class:`PromptTokens` or a :class:`CFGPair` (then ``batch_size``, ``negative_prompt`` and
    the input image come from the pair). ``top_k=1`` is greedy. Image ``i`` uses seed ``seed + i`` (mod 2**64;
    ``seed`` in 0..2**64 - 1; see the module docstring). ``cfg_weight`` >= 0 (1 = no guidance).

    ``image`` (one PIL image or IMAGE ``[1, H, W, 3]``) makes ``prompt`` an edit instruction: every image of the
    batch edits it with the three-row guidance of :mod:`janus_core.guidance` (``image_cfg_weight`` = w2).
    ``init_tokens`` (``[576]`` or ``[1 or B, 576]``) with ``mask`` (bool ``[576]``, ``[24, 24]``, or per image
    ``[B, ...]``; True = resample) keep the unmasked tokens and sample the masked ones; a mask that resamples
    nothing returns ``init_tokens`` (one row per image) without running the model.

    ``callback(step, total, tokens_so_far [B, step + 1])`` runs after every position (kept ones included);
    raising stops the loop. A batch whose :func:`generation_bytes` does not fit the device's free memory is
    refused with a :class:`JanusError` before anything is allocated (:mod:`janus_core.memory`).
    """
    require_ar(model)
    sampling = check_sampling_args(temperature, top_k, top_p)
    cfg_weight, image_cfg_weight = _check_weights(cfg_weight, image_cfg_weight)
    seed = check_seed(seed)
    pair = _resolve_pair(model, prompt, batch_size, negative_prompt, image)
    b, device, total = pair.batch_size, model.device, image_token_count(model)
    init = resample = None
    kept = 0  # leading positions every image keeps
    if init_tokens is not None or mask is not None:
        init, resample = check_init_tokens(model, init_tokens, mask, b)
        kept = kept_prefix(resample)
        if kept == total:
            return init
    check_fits(device, generation_bytes(model, pair, kept), "Image editing" if pair.is_edit else "Image generation", b)
    generators = None if sampling[1] == 1 else row_generators(seed, b, device)
    tokens = torch.empty(b, total, dtype=torch.long, device=device)
    steps = cfg_logit_steps(model, pair)
    _, out = next(steps)
    if kept:
        tokens[:, :kept] = init[:, :kept]
        _, out = steps.send(tokens[:, :kept])
        for step in range(kept):
            if callback is not None:
                callback(step, total, tokens[:, : step + 1])
    for step in range(kept, total):
        logits = guide(out, pair.num_rows, cfg_weight, image_cfg_weight)
        tokens[:, step] = _draw(logits, generators, sampling, None if init is None else init[:, step],
                                None if resample is None else resample[:, step])
        if callback is not None:
            callback(step, total, tokens[:, : step + 1])
        if step < total - 1:
            _, out = steps.send(tokens[:, step])
    steps.close()
    return tokens


def decode_bytes(model: JanusModel, batch: int) -> int:
    """Peak bytes :func:`decode_image_tokens` allocates on the VQ decoder's device to decode ``batch`` images
    at once (the decoder's activations; see :func:`janus_core.modules.vq.decoder_activation_bytes`)."""
    vq = model.config.vq
    return decoder_activation_bytes(vq.ch, vq.ch_mult, model.config.image_token_grid, batch, vq_dtype(model))


@torch.inference_mode()
def decode_image_tokens(model: JanusModel, tokens: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
    """VQ ids ``[B, 576]`` -> images ``[B, 384, 384, 3]`` float32 in 0..1 on the CPU (ComfyUI IMAGE layout).

    Decodes as many images at once as fit in the decoder device's free memory (:func:`decode_bytes`; about
    0.23 GB per image in bfloat16 for the released models), so a large batch is decoded in chunks instead of
    running out of memory; refused only when not even one image fits. ``progress(done, B)`` is called after
    every few images (raise in it to cancel).
    """
    require_ar(model)
    grid = model.config.image_token_grid
    tokens = _check_tokens(model, tokens)
    if tokens.shape[1] != grid[0] * grid[1]:
        raise JanusError(f"Expected image tokens of shape [B, {grid[0] * grid[1]}] (whole images), got "
                         f"{list(tokens.shape)}.")
    vq = model.net.gen_vision_model
    device = vq.post_quant_conv.weight.device
    count = tokens.shape[0]
    side = grid[0] * vq.downsample_factor, grid[1] * vq.downsample_factor
    images = torch.empty(count, *side, 3)
    for span in fitting_chunks(device, count, lambda n: decode_bytes(model, n), "VQ decoding", progress):
        images[span] = images_from_decoded(vq.decode_code(tokens[span].to(device).long(), grid))
    return images
