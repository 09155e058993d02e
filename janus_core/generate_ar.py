"""Janus / Janus-Pro text-to-image: prompt encoding, CFG rows, the 576-step token loop, VQ decoding.

Reference algorithm (DeepSeek's ``generation_inference.py``): the conditional row is the templated prompt
followed by ``<begin_of_image>``; the unconditional row keeps BOS and ``<begin_of_image>`` and replaces
everything between with the pad token (attended, no mask). At each step the gen head's logits are mixed
as ``uncond + w * (cond - uncond)``, a token is drawn and fed back to both rows through
``gen_aligner(gen_embed(token))``. Our loop prefills the two prompt rows once (shared by the whole batch)
into a preallocated KV cache and then feeds one token per row per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from .arguments import whole_number
from .errors import JanusError
from .images import images_from_decoded
from .llm import KVCache, forward_bytes, kv_cache_bytes
from .memory import check_fits, largest_fitting
from .model import JanusModel
from .modules.vq import decoder_activation_bytes
from .prompts import IMAGE_TOKENS, PromptTokens, check_same_model, encode_prompt, model_key
from .sampling import (
    GENERATOR_BYTES,
    SAMPLING_BYTES_PER_LOGIT,
    cfg_mix,
    check_guidance_weight,
    check_sampling_args,
    check_seed,
    row_generators,
    sample_next,
)

logger = logging.getLogger(__name__)

TOKEN_GRID = (24, 24)

TokenCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True, eq=False)
class CFGPair:
    """Conditional and unconditional prompt rows for ``batch_size`` images.

    ``cond_ids [Lc]``; ``uncond_ids [Lu]`` (the reference pad row, or a negative prompt).
    """

    cond_ids: torch.Tensor
    uncond_ids: torch.Tensor
    batch_size: int
    variant: str
    model_folder: str
    negative_prompt: str | None = None


def _check_prompt_model(model: JanusModel, prompt: PromptTokens | CFGPair, what: str) -> None:
    check_same_model(model, prompt.variant, prompt.model_folder, what)


def build_cfg_pair(model: JanusModel, prompt: str | PromptTokens, batch_size: int = 1,
                   negative_prompt: str | PromptTokens | None = None) -> CFGPair:
    """The reference CFG rows (uncond = BOS + pads + ``<begin_of_image>``) or, with a negative prompt, that
    prompt's rows as the unconditional branch."""
    _require_ar(model)
    batch_size = whole_number("batch_size", batch_size, minimum=1)
    cond = prompt if isinstance(prompt, PromptTokens) else encode_prompt(model, prompt)
    _check_prompt_model(model, cond, "prompt")
    negative_text = None
    if negative_prompt is None or (isinstance(negative_prompt, str) and not negative_prompt.strip()):
        uncond_ids = cond.ids.clone()
        uncond_ids[1:-1] = model.tokenizer.pad_id
    else:
        neg = (negative_prompt if isinstance(negative_prompt, PromptTokens)
               else encode_prompt(model, negative_prompt, "negative prompt"))
        _check_prompt_model(model, neg, "negative prompt")
        uncond_ids = neg.ids
        negative_text = neg.text
    return CFGPair(cond.ids, uncond_ids, batch_size, model.variant, model_key(model), negative_text)


def _require_ar(model: JanusModel) -> None:
    if model.is_flow:
        raise JanusError("JanusFlow generates images with the flow sampler, not with VQ tokens; use the "
                         "'JanusFlow ODE Sampler' node (python -m janus_core flow; generate_flow_latents in Python) "
                         "for this model.")


def _prefill(model: JanusModel, pair: CFGPair, extra: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Prefill [cond, uncond] once and share it with every image.

    Returns the cache for ``2B`` rows (cond rows first) with room for ``extra`` more positions, the
    last-position hidden states ``[2, hidden]`` and each row's next RoPE position ``[2B, 1]``.
    """
    runner, device, b = model.llm, model.device, pair.batch_size
    rows = [pair.cond_ids, pair.uncond_ids]
    length = max(r.numel() for r in rows)
    padded = any(r.numel() != length for r in rows)
    ids = torch.full((2, length), model.tokenizer.pad_id, dtype=torch.long)
    valid = torch.zeros(2, length, dtype=torch.bool)
    for i, r in enumerate(rows):  # left padding, masked out
        ids[i, length - r.numel():] = r
        valid[i, length - r.numel():] = True
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    small = KVCache.allocate(runner, 2, length, with_mask=padded)
    hidden = runner.forward(runner.embed(ids), small, positions, new_valid=valid if padded else None)
    cache = KVCache.allocate(runner, 2 * b, length + extra, with_mask=padded)
    source = torch.arange(2, device=device).repeat_interleave(b)
    small.copy_prefix_into(cache, slice(None), source)
    next_pos = (positions[:, -1] + 1)[source].unsqueeze(1)
    return cache, hidden[:, -1], next_pos


StepStream = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, None]


def cfg_logit_steps(model: JanusModel, pair: CFGPair) -> StepStream:
    """The AR loop without sampling: yields ``(hidden [2B, H], gen-head logits [2B, V])`` per step.

    Rows ``[0, B)`` are conditional, ``[B, 2B)`` unconditional. Send the chosen tokens ``[B]`` to get the
    next step; the first yield is the prefill (logits at ``<begin_of_image>``).
    """
    net, b = model.net, pair.batch_size
    cache, last, positions = _prefill(model, pair, IMAGE_TOKENS)
    source = torch.arange(2, device=last.device).repeat_interleave(b)
    hidden = last[source]
    for step in range(IMAGE_TOKENS):
        chosen = yield hidden, net.gen_head(hidden)
        if step == IMAGE_TOKENS - 1:
            return
        embeds = net.image_token_embeds(chosen).repeat(2, 1).unsqueeze(1)  # [2B, 1, H]
        hidden = model.llm.forward(embeds, cache, positions + step)[:, -1]


def generation_bytes(model: JanusModel, pair: CFGPair) -> int:
    """Peak bytes :func:`generate_image_tokens` allocates on the model's device for ``pair`` (beyond the weights).

    The KV cache of ``2B`` rows x (prompt + 576) positions and the sampled tokens, plus the larger of the prefill
    (the two prompt rows' cache and forward) and one decode step (forward of ``2B`` rows, the gen head's
    activations and logits ``[2B, V]``, CFG mixing and sampling in float32).
    """
    spec, dtype, device = model.config.llm, model.dtype, model.device
    b, rows = pair.batch_size, 2 * pair.batch_size
    length = max(pair.cond_ids.numel(), pair.uncond_ids.numel())
    prefill = kv_cache_bytes(spec, 2, length, dtype) + forward_bytes(spec, 2, length, length, dtype, device)
    head = model.net.gen_head
    head_size = head.vision_head.weight.dtype.itemsize
    embed, vocab = head.output_mlp_projector.out_features, head.vision_head.out_features
    step = (forward_bytes(spec, rows, 1, length + IMAGE_TOKENS, dtype, device)
            + rows * (spec.hidden_size * (dtype.itemsize + head_size) + 2 * embed * head_size + vocab * head_size)
            + b * vocab * SAMPLING_BYTES_PER_LOGIT)
    held = kv_cache_bytes(spec, rows, length + IMAGE_TOKENS, dtype) + b * (IMAGE_TOKENS * 8 + GENERATOR_BYTES)
    return held + max(prefill, step)


@torch.inference_mode()
def generate_image_tokens(model: JanusModel, prompt: str | PromptTokens | CFGPair, batch_size: int = 1,
                          seed: int = 0, cfg_weight: float = 5.0, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, negative_prompt: str | None = None,
                          callback: TokenCallback | None = None) -> torch.Tensor:
    """Sample ``[B, 576]`` VQ token ids (LongTensor, raster order over the 24x24 grid) for ``prompt``.

    ``prompt`` is text, a :class:`PromptTokens` or a :class:`CFGPair` (then ``batch_size`` and
    ``negative_prompt`` come from the pair). ``top_k=1`` is greedy. Image ``i`` uses seed ``seed + i``
    (mod 2**64; ``seed`` in 0..2**64 - 1). ``cfg_weight`` >= 0 (1 = no guidance).
    ``callback(step, total, tokens_so_far [B, step + 1])`` runs after every token; raising stops the loop.
    A batch whose :func:`generation_bytes` does not fit the device's free memory is refused with a
    :class:`JanusError` before anything is allocated (:mod:`janus_core.memory`).
    """
    _require_ar(model)
    temperature, top_k, top_p = check_sampling_args(temperature, top_k, top_p)
    cfg_weight = check_guidance_weight(cfg_weight)
    seed = check_seed(seed)
    if isinstance(prompt, CFGPair):
        pair = prompt
        _check_prompt_model(model, pair, "CFG pair")
    else:
        pair = build_cfg_pair(model, prompt, batch_size, negative_prompt)
    b, device = pair.batch_size, model.device
    check_fits(device, generation_bytes(model, pair), "Image generation", b)
    generators = None if top_k == 1 else row_generators(seed, b, device)
    tokens = torch.empty(b, IMAGE_TOKENS, dtype=torch.long, device=device)
    steps = cfg_logit_steps(model, pair)
    _, out = next(steps)
    for step in range(IMAGE_TOKENS):
        logits = cfg_mix(out[:b].float(), out[b:].float(), cfg_weight)
        tokens[:, step] = sample_next(logits, generators, temperature, top_k, top_p)
        if callback is not None:
            callback(step, IMAGE_TOKENS, tokens[:, : step + 1])
        if step < IMAGE_TOKENS - 1:
            _, out = steps.send(tokens[:, step])
    steps.close()
    return tokens


def decode_bytes(model: JanusModel, batch: int) -> int:
    """Peak bytes :func:`decode_image_tokens` allocates on the VQ decoder's device to decode ``batch`` images
    at once (the decoder's activations; see :func:`janus_core.modules.vq.decoder_activation_bytes`)."""
    vq = model.config.vq
    dtype = model.net.gen_vision_model.post_quant_conv.weight.dtype
    return decoder_activation_bytes(vq.ch, vq.ch_mult, TOKEN_GRID, batch, dtype)


@torch.inference_mode()
def decode_image_tokens(model: JanusModel, tokens: torch.Tensor) -> torch.Tensor:
    """VQ ids ``[B, 576]`` -> images ``[B, 384, 384, 3]`` float32 in 0..1 on the CPU (ComfyUI IMAGE layout).

    Decodes as many images at once as fit in the decoder device's free memory (:func:`decode_bytes`; about
    0.23 GB per image in bfloat16 for the released models), so a large batch is decoded in chunks instead of
    running out of memory; refused only when not even one image fits.
    """
    _require_ar(model)
    if tokens.dim() != 2 or tokens.shape[1] != IMAGE_TOKENS:
        raise JanusError(f"Expected image tokens of shape [B, {IMAGE_TOKENS}], got {list(tokens.shape)}.")
    vq = model.net.gen_vision_model
    device = vq.post_quant_conv.weight.device
    count = tokens.shape[0]
    chunk = max(largest_fitting(device, count, lambda n: decode_bytes(model, n), "VQ decoding"), 1)
    if chunk < count:
        logger.info("VQ decoding %d images in chunks of %d (free memory)", count, chunk)
    side = TOKEN_GRID[0] * vq.downsample_factor, TOKEN_GRID[1] * vq.downsample_factor
    images = torch.empty(count, *side, 3)
    for start in range(0, count, chunk):
        codes = tokens[start:start + chunk].to(device).long()
        images[start:start + chunk] = images_from_decoded(vq.decode_code(codes, TOKEN_GRID))
    return images
