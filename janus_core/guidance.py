"""Guidance rows of AR generation (``DSJANUS_CFG``): two rows for text-to-image, three for instruction editing.

Text-to-image (DeepSeek's ``generation_inference.py``): the conditional row is the templated prompt ending in
``<begin_of_image>``; the unconditional row keeps BOS and ``<begin_of_image>`` and replaces everything between
with the pad token (attended, no mask), or is a negative prompt. Logits are mixed as
``uncond + w1 * (cond - uncond)``.

Instruction editing (Janus-4o, ``generate_image_v2v_mask_v3`` of FreedomIntelligence/ShareGPT-4o-Image): the
prompt (:func:`processor.editing_prompt`) holds the input image twice before the instruction, and each output
image has three rows over it:

- *full*: the image's SigLIP understanding features (vision tower + aligner) at the placeholders, and its VQ
  tokens embedded as generated tokens are (``gen_aligner(gen_embed(ids))``) over the pads;
- *part*: the SigLIP features only (the pads stay pad-token embeddings);
- *uncond*: BOS, pads, ``<begin_of_image>`` (or a negative prompt, which sees no image).

Both image paths take the same preprocessed pixels (the model's image preprocessing). Logits are mixed as
``cond = (full + w2 * part) / (1 + w2)``, ``logits = uncond + w1 * (cond - uncond)`` (``w1 = cfg_weight``,
``w2 = image_cfg_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arguments import whole_number
from .errors import JanusError
from .image_tokens import vq_codes
from .images import ImagesArg
from .model import JanusModel
from .prefill import left_pad
from .prompts import PromptTokens, check_same_model, encode_prompt, is_blank, model_key, require_ar
from .sampling import cfg_mix


@dataclass(frozen=True, eq=False)
class CFGPair:
    """The guidance rows of an AR generation of ``batch_size`` images, for one model.

    ``cond_ids [Lc]`` (the prompt, or the editing prompt) and ``uncond_ids [Lu]`` (the reference pad row, or a
    negative prompt). ``edit_pixels`` (``[3, S, S]`` float32, CPU: the input image after the model's image
    preprocessing) makes it an editing pair of three rows: full and part both read ``cond_ids``.
    """

    cond_ids: torch.Tensor
    uncond_ids: torch.Tensor
    batch_size: int
    variant: str
    model_folder: str
    negative_prompt: str | None = None
    edit_pixels: torch.Tensor | None = None

    @property
    def is_edit(self) -> bool:
        return self.edit_pixels is not None

    @property
    def row_ids(self) -> list[torch.Tensor]:
        """Token ids of each distinct row: ``[cond, uncond]``, or ``[full, part, uncond]`` when editing."""
        return [self.cond_ids, self.cond_ids, self.uncond_ids] if self.is_edit else [self.cond_ids, self.uncond_ids]

    @property
    def num_rows(self) -> int:
        """Rows per image: 2, or 3 when editing."""
        return 3 if self.is_edit else 2

    @property
    def prompt_len(self) -> int:
        """Positions of the (left-padded) prompt rows."""
        return max(self.cond_ids.numel(), self.uncond_ids.numel())


def check_pair_model(model: JanusModel, pair: PromptTokens | CFGPair, what: str) -> None:
    """Raise if ``pair`` (a prompt or CFG pair) was built with another model."""
    check_same_model(model, pair.variant, pair.model_folder, what)


def edit_pixels(model: JanusModel, image: ImagesArg) -> torch.Tensor:
    """The one input image of an edit (PIL image or IMAGE tensor ``[1, H, W, 3]``) preprocessed: ``[3, S, S]``."""
    pixels = model.image_processor.batch(image)
    if pixels.shape[0] != 1:
        raise JanusError(f"Instruction editing takes one input image, got {pixels.shape[0]}; every image of the "
                         "batch edits that one image (image i with seed + i). Pick one image of the batch first.")
    return pixels[0]


def build_cfg_pair(model: JanusModel, prompt: str | PromptTokens, batch_size: int = 1,
                   negative_prompt: str | PromptTokens | None = None, image: ImagesArg | None = None) -> CFGPair:
    """The guidance rows for ``batch_size`` images of ``prompt``.

    Without ``image``: the reference CFG rows (uncond = BOS + pads + ``<begin_of_image>``) or, with a negative
    prompt, that prompt's row as the unconditional branch. With ``image`` (one PIL image or IMAGE ``[1, H, W, 3]``)
    ``prompt`` is an edit instruction and the pair holds the three editing rows (module docstring); a negative
    prompt then replaces the pad row as usual.
    """
    require_ar(model, None if image is None else "Instruction editing")
    batch_size = whole_number("batch_size", batch_size, minimum=1)
    if isinstance(prompt, PromptTokens) and is_blank(prompt):
        raise JanusError("The prompt is empty; describe the image you want (an empty prompt can only serve as the "
                         "negative one, where it means no negative prompt).")
    if image is None:
        cond = prompt if isinstance(prompt, PromptTokens) else encode_prompt(model, prompt)
        check_pair_model(model, cond, "prompt")
        pixels = None
    else:
        if isinstance(prompt, PromptTokens):
            check_pair_model(model, prompt, "prompt")
            prompt = prompt.text
        cond = encode_prompt(model, prompt, "edit instruction", edit=True)
        pixels = edit_pixels(model, image)
    negative_text = None
    if isinstance(negative_prompt, PromptTokens):
        check_pair_model(model, negative_prompt, "negative prompt")
    if is_blank(negative_prompt):
        uncond_ids = cond.ids.clone()
        uncond_ids[1:-1] = model.tokenizer.pad_id
    else:
        neg = (negative_prompt if isinstance(negative_prompt, PromptTokens)
               else encode_prompt(model, negative_prompt, "negative prompt"))
        check_pair_model(model, neg, "negative prompt")
        uncond_ids = neg.ids
        negative_text = neg.text
    return CFGPair(cond.ids, uncond_ids, batch_size, model.variant, model_key(model), negative_text, pixels)


def _substitute(embeds: torch.Tensor, where: torch.Tensor, rows: torch.Tensor, what: str) -> None:
    """``embeds[where] = rows`` in place, after checking that the counts agree."""
    if int(where.sum()) != rows.shape[0]:
        raise JanusError(f"internal: the editing prompt has {int(where.sum())} {what} positions but the image gave "
                         f"{rows.shape[0]} rows; the checkpoint's vision config and tokenizer do not match.")
    embeds[where] = rows.to(embeds.dtype)


def row_embeds(model: JanusModel, pair: CFGPair) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM input of the pair's distinct rows: ``(embeds [R, L, hidden], valid [R, L])``, left-padded.

    For an editing pair the input image's SigLIP features go to the placeholders of rows full and part and its
    VQ tokens (embedded) to the pads of row full.
    """
    net, device = model.net, model.device
    rows = [model.llm.embed(ids.to(device)) for ids in pair.row_ids]
    if pair.is_edit:
        pixels = pair.edit_pixels[None]
        features = net.image_features(pixels.to(device=device, dtype=model.dtype))[0]
        tokens = net.image_token_embeds(vq_codes(model, pixels).to(device))[0]
        ids = pair.cond_ids.to(device)
        for r in (0, 1):
            _substitute(rows[r], ids == model.tokenizer.image_id, features, "image placeholder")
        _substitute(rows[0], ids == model.tokenizer.pad_id, tokens, "image token")
    return left_pad(rows, 0.0)


def guide(logits: torch.Tensor, rows: int, cfg_weight: float, image_cfg_weight: float) -> torch.Tensor:
    """Mix the rows' logits ``[rows * B, ...]`` (kind-major: cond / full rows first, uncond last) into the guided
    logits ``[B, ...]`` in float32 (formulas in the module docstring)."""
    parts = logits.float().chunk(rows)
    if rows == 2:
        return cfg_mix(parts[0], parts[1], cfg_weight)
    full, part, uncond = parts
    return cfg_mix((full + image_cfg_weight * part) / (1 + image_cfg_weight), uncond, cfg_weight)
