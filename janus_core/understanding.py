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

import numpy as np
import torch
from PIL import Image

from .errors import JanusError
from .llm import KVCache
from .model import JanusModel
from .processor import UnderstandingInputs, understanding_inputs
from .sampling import check_sampling_args, row_generators, sample_next

logger = logging.getLogger(__name__)

ImagesArg = Sequence[Image.Image] | torch.Tensor
Callback = Callable[[int, int], None]


def to_pil_images(images: ImagesArg) -> list[Image.Image]:
    """PIL images (any mode) or a ComfyUI IMAGE tensor ``[B, H, W, 3]`` in 0..1 -> list of RGB PIL images.

    Tensor values are scaled by 255 and rounded, so an image loaded as ``uint8 / 255`` gets its exact
    original pixels back.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[-1] != 3:
            raise JanusError(
                f"The IMAGE tensor has shape {list(images.shape)}, expected [B, H, W, 3] (batch, height, "
                "width, RGB channels, values in 0..1) as ComfyUI's IMAGE type. Convert masks or RGBA "
                "images to RGB first."
            )
        if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
            raise JanusError(
                f"The IMAGE tensor of shape {list(images.shape)} holds no pixels; give at least one image."
            )
        values = images.detach().float().cpu().nan_to_num(0.0).clamp(0.0, 1.0)
        arr = (values * 255.0).round().to(torch.uint8).numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
    if images is None or len(images) == 0:
        raise JanusError("No images were given; image understanding needs at least one image.")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise JanusError(
                f"Image {i} is a {type(image).__name__}; expected PIL images or an IMAGE tensor [B, H, W, 3]."
            )
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def _check_question(question: str) -> None:
    if not isinstance(question, str) or not question.strip():
        raise JanusError("The question is empty; type what you want to know about the image(s).")


def _prompt_inputs(model: JanusModel, question: str, num_images: int, system_prompt: str | None
                   ) -> UnderstandingInputs:
    return understanding_inputs(model.tokenizer, model.variant, question, num_images,
                                num_image_tokens=model.config.num_image_tokens, system_prompt=system_prompt)


def _image_features(model: JanusModel, images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> LLM-space features ``[N, R, hidden]`` (R = 576, or 577 for JanusFlow)."""
    pixels = torch.stack([model.image_processor(image) for image in images])
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
    _check_question(question)
    pil = to_pil_images(images)
    inputs = _prompt_inputs(model, question, len(pil), system_prompt)
    return _fuse(model, inputs, _image_features(model, pil)), inputs


def _keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Shrink ``cache`` in place to the batch rows ``rows``."""
    cache.keys = [k[rows] for k in cache.keys]
    cache.values = [v[rows] for v in cache.values]
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
    batch, width = len(prompts), int(lengths.max())
    hidden_size = prompts[0].shape[-1]
    embeds = torch.zeros(batch, width, hidden_size, dtype=prompts[0].dtype, device=device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        embeds[i, width - p.shape[0]:] = p
        valid[i, width - p.shape[0]:] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)

    cache = KVCache.allocate(llm, batch, width + max_new_tokens - 1, with_mask=True)
    logits = llm.lm_logits(llm.forward(embeds, cache, positions=positions, new_valid=valid)[:, -1])
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


def understand(model: JanusModel, images: ImagesArg, question: str, max_new_tokens: int = 512,
               temperature: float = 0.0, top_p: float = 0.95, seed: int = 0, system_prompt: str | None = None,
               per_image: bool = True, callback: Callback | None = None) -> list[str]:
    """Answer ``question`` about ``images`` (PIL images or an IMAGE tensor ``[B, H, W, 3]`` in 0..1).

    ``per_image``: one answer per image (all prompts run as one batch); otherwise one answer to a single
    prompt showing all images. ``temperature == 0`` is greedy; otherwise sampling with ``top_p`` and
    seed ``seed + i`` for answer ``i``. ``system_prompt`` None uses DeepSeek's default, ``""`` none.
    ``callback(step, max_new_tokens)`` runs after every generated token; an exception it raises stops
    generation and propagates.
    """
    _check_question(question)
    if max_new_tokens < 1 or int(max_new_tokens) != max_new_tokens:
        raise JanusError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}.")
    max_new_tokens = int(max_new_tokens)
    if temperature < 0:
        raise JanusError(f"temperature must be >= 0 (0 = greedy, deterministic), got {temperature}.")
    check_sampling_args(temperature, 0, top_p, greedy_at_zero=True)
    pil = to_pil_images(images)

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
