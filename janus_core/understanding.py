"""Image understanding (captions, visual questions) for every Janus variant.

The prompt is DeepSeek's: system prompt, the variant's roles, one ``<begin_of_image>`` + 576
placeholders + ``<end_of_image>`` block per image before the question. The placeholder positions
(JanusFlow: also each ``<begin_of_image>``) get the image features, the LLM then decodes greedily
(``temperature == 0``) or with temperature + top-p sampling until EOS or ``max_new_tokens``.

Several prompts run as one batch: they are left-padded to the same length, padding is masked out of
attention and each row's RoPE positions start at 0 at its first real token, so every row gives what
it would give alone. Rows that reach EOS are dropped from the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .arguments import whole_number
from .errors import JanusError
from .images import ImagesArg, to_pil_images
from .llm import KVCache, forward_bytes, kv_cache_bytes, work_buffer_bytes
from .memory import check_fits
from .model import JanusModel
from .modules.siglip import vit_activation_bytes
from .prefill import left_pad, positions_of, prefill_rows
from .processor import UnderstandingInputs, check_question, understanding_inputs
from .sampling import SAMPLING_BYTES_PER_LOGIT, check_sampling_args, check_seed, row_generators, sample_next

logger = logging.getLogger(__name__)

Callback = Callable[[int, int], None]


def _prompt_inputs(model: JanusModel, question: str, num_images: int, system_prompt: str | None
                   ) -> UnderstandingInputs:
    return understanding_inputs(model.tokenizer, model.variant, question, num_images,
                                num_image_tokens=model.config.num_image_tokens, system_prompt=system_prompt)


def _image_features(model: JanusModel, images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> LLM-space features ``[N, R, hidden]`` (R = 576, or 577 for JanusFlow)."""
    pixels = model.image_processor.batch(images)
    return model.net.image_features(pixels.to(model.device))


def _fuse(model: JanusModel, inputs: UnderstandingInputs, features: torch.Tensor) -> torch.Tensor:
    """Token embeddings ``[T, hidden]`` with the ``image_mask`` rows replaced in order by ``features``."""
    ids = inputs.input_ids.to(model.device)
    embeds = model.llm.embed(ids)
    rows = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    mask = inputs.image_mask.to(model.device)
    if int(mask.sum()) != rows.shape[0]:
        raise JanusError(
            f"internal: the prompt has {int(mask.sum())} image positions but the images gave {rows.shape[0]} "
            "feature rows; the checkpoint's vision config and tokenizer do not match."
        )
    embeds[mask] = rows
    return embeds


@torch.inference_mode()
def understanding_embeds(model: JanusModel, images: ImagesArg, question: str,
                         system_prompt: str | None = None) -> tuple[torch.Tensor, UnderstandingInputs]:
    """Fused input embeddings ``[T, hidden]`` of one prompt holding all ``images``, and its token inputs.

    ``system_prompt`` None uses DeepSeek's default, ``""`` none.
    """
    check_question(question)
    pil = to_pil_images(images, model.image_processor.background)
    inputs = _prompt_inputs(model, question, len(pil), system_prompt)
    return _fuse(model, inputs, _image_features(model, pil)), inputs


def _keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Shrink ``cache`` in place to the batch rows ``rows``, one tensor at a time (a copy of all layers at once
    would need the cache's memory twice)."""
    for tensors in (cache.keys, cache.values):
        for i, t in enumerate(tensors):
            tensors[i] = t[rows]
    if cache.valid is not None:
        cache.valid = cache.valid[rows]


@torch.inference_mode()
def generate_text_ids(model: JanusModel, prompts: Sequence[torch.Tensor], max_new_tokens: int = 512,
                      temperature: float = 0.0, top_p: float = 0.95, seed: int = 0,
                      callback: Callback | None = None) -> list[list[int]]:
    """Decode answers for prompt embeddings ``[T_i, hidden]`` (lengths may differ); one id list per prompt.

    Greedy when ``temperature == 0``, else row ``i`` samples with a generator seeded ``seed + i``. Each
    list ends with EOS if the row stopped there. ``callback(step, max_new_tokens)`` runs after each step.
    """
    if not prompts:
        raise JanusError("No prompts to answer.")
    llm = model.llm
    device = model.device
    lengths = torch.tensor([p.shape[0] for p in prompts], device=device)
    embeds, valid = left_pad([p.to(device) for p in prompts], 0.0)
    batch, width = valid.shape
    cache, hidden = prefill_rows(llm, embeds, width + max_new_tokens - 1, valid=valid, positions=positions_of(valid))
    logits = llm.lm_logits(hidden[:, -1])
    generators = row_generators(seed, batch, device) if temperature > 0 else None
    answers: list[list[int]] = [[] for _ in range(batch)]
    active = list(range(batch))
    next_pos = lengths
    eos = model.tokenizer.eos_id
    for step in range(max_new_tokens):
        tokens = sample_next(logits, generators, temperature, top_p=top_p)
        keep = []
        for j, (row, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            answers[row].append(token)
            if token != eos:
                keep.append(j)
        if callback is not None:
            callback(step + 1, max_new_tokens)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            _keep_rows(cache, rows)
            tokens, next_pos = tokens[rows], next_pos[rows]
            active = [active[j] for j in keep]
            if generators is not None:
                generators = [generators[j] for j in keep]
        hidden = llm.forward(llm.embed(tokens[:, None]), cache, positions=next_pos[:, None])
        logits = llm.lm_logits(hidden[:, -1])
        next_pos = next_pos + 1
    return answers


def _answer_bytes(model: JanusModel, num_images: int, prompt_len: int, max_new_tokens: int, per_image: bool) -> int:
    """Peak bytes :func:`understand` allocates on the model's device (see :func:`understanding_bytes`)."""
    spec, dtype, device = model.config.llm, model.dtype, model.device
    size, hidden, vit = dtype.itemsize, spec.hidden_size, model.config.siglip
    image_rows = model.config.num_image_tokens + 1  # JanusFlow adds a begin-of-understanding row
    vision = (num_images * 3 * vit.image_size ** 2 * (4 + size)  # float32 pixels and their cast
              + vit_activation_bytes(vit.width, vit.mlp_ratio, vit.num_patches, num_images, dtype)
              + 3 * num_images * image_rows * hidden * size)  # the aligner's activations
    rows = num_images if per_image else 1
    context = prompt_len + max_new_tokens
    cache = kv_cache_bytes(spec, rows, context, dtype)
    held = (num_images * image_rows * hidden * size  # image features
            + 2 * rows * prompt_len * hidden * size  # the fused prompts and their padded batch
            + cache)
    prefill = forward_bytes(spec, rows, prompt_len, prompt_len, dtype, device)
    decode = (work_buffer_bytes(spec, rows, prompt_len, dtype)  # the prefill's buffers, replaced one by one
              + forward_bytes(spec, rows, 1, context, dtype, device)
              + rows * spec.vocab_size * (size + SAMPLING_BYTES_PER_LOGIT)
              + 2 * cache // (2 * spec.num_hidden_layers))  # _keep_rows: one layer's keys, old and new copy
    return max(vision, held + max(prefill, decode))


def understanding_bytes(model: JanusModel, num_images: int, question: str, max_new_tokens: int = 512,
                        per_image: bool = True, system_prompt: str | None = None) -> int:
    """Peak bytes :func:`understand` allocates on the model's device (beyond the weights) for ``num_images``.

    The larger of the vision phase (pixels, SigLIP and aligner activations of every image at once) and the text
    phase: image features, the prompts, the KV cache of one row per prompt for prompt + ``max_new_tokens``
    positions, with the prefill forward or a decode step (its logits and sampling, a row-dropping copy).
    """
    per_prompt = 1 if per_image else num_images
    prompt_len = _prompt_inputs(model, question, per_prompt, system_prompt).input_ids.shape[0]
    return _answer_bytes(model, num_images, prompt_len, max_new_tokens, per_image)


def understand(model: JanusModel, images: ImagesArg, question: str, max_new_tokens: int = 512,
               temperature: float = 0.0, top_p: float = 0.95, seed: int = 0, system_prompt: str | None = None,
               per_image: bool = True, callback: Callback | None = None) -> list[str]:
    """Answer ``question`` about ``images`` (PIL images of any mode or an IMAGE tensor ``[B, H, W, 3]`` in 0..1;
    conversion rules in :mod:`janus_core.images`).

    ``per_image``: one answer per image (all prompts run as one batch); otherwise one answer to a single
    prompt showing all images. ``temperature == 0`` is greedy; otherwise sampling with ``top_p`` and
    seed ``seed + i`` for answer ``i``. ``system_prompt`` None uses DeepSeek's default, ``""`` none.
    ``callback(step, max_new_tokens)`` runs after every generated token; an exception it raises stops
    generation and propagates. Refused with a :class:`JanusError` when the run (:func:`understanding_bytes`)
    does not fit the device's free memory.
    """
    check_question(question)
    max_new_tokens = whole_number("max_new_tokens", max_new_tokens, minimum=1)
    temperature, _, top_p = check_sampling_args(temperature, 0, top_p, greedy_at_zero=True)
    seed = check_seed(seed)
    if not isinstance(per_image, bool):
        raise JanusError(f"per_image must be True (one answer per image) or False (one answer for all), got "
                         f"{per_image!r}.")
    pil = to_pil_images(images, model.image_processor.background)

    groups = [[image] for image in pil] if per_image else [pil]
    inputs = [_prompt_inputs(model, question, len(group), system_prompt) for group in groups]
    context = model.config.llm.max_position_embeddings
    prompt_len = max(inp.input_ids.shape[0] for inp in inputs)
    if prompt_len + max_new_tokens > context:
        what = "" if per_image else f" ({len(pil)} images at {model.config.num_image_tokens + 2} tokens each)"
        raise JanusError(
            f"The prompt is {prompt_len} tokens{what}; with max_new_tokens={max_new_tokens} that is "
            f"{prompt_len + max_new_tokens}, more than the model's context of {context} tokens. Lower "
            "max_new_tokens, shorten the question or use fewer images per prompt."
        )

    check_fits(model.device, _answer_bytes(model, len(pil), prompt_len, max_new_tokens, per_image),
               "Image understanding", len(pil), fix="use fewer images at once or lower max_new_tokens")
    with torch.inference_mode():
        features = _image_features(model, pil)
        prompts, start = [], 0
        for group, inp in zip(groups, inputs, strict=True):
            prompts.append(_fuse(model, inp, features[start:start + len(group)]))
            start += len(group)
    logger.info("understanding: %d prompt(s) of %d tokens, up to %d new tokens, %s", len(prompts), prompt_len,
                max_new_tokens, "greedy" if temperature == 0 else f"temperature {temperature}, top_p {top_p}")
    ids = generate_text_ids(model, prompts, max_new_tokens, temperature, top_p, seed, callback)
    return [model.tokenizer.decode(row) for row in ids]
