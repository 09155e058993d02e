"""Text-to-image prompts shared by the AR and flow samplers, and the check that inputs belong to a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import JanusError
from .model import JanusModel
from .processor import check_text, editing_prompt, generation_prompt

IMAGE_TOKENS = 576  # image positions after the prompt: 24 x 24 VQ tokens or latent patches


@dataclass(frozen=True, eq=False)
class PromptTokens:
    """A templated generation prompt: ``ids [L]`` (BOS ... ``<begin_of_image>``) for one model."""

    text: str
    prompt_string: str
    ids: torch.Tensor
    variant: str
    model_folder: str


def model_key(model: JanusModel) -> str:
    """Identifies the model whose tokenizer built a prompt or CFG pair."""
    return str(model.folder)


def check_same_model(model: JanusModel, variant: str, model_folder: str, what: str) -> None:
    """Raise if something built for ``(variant, model_folder)`` is used with another ``model``."""
    if model_folder != model_key(model) or variant != model.variant:
        raise JanusError(
            f"This {what} was built for another model ({variant} from {model_folder}); rebuild it with the "
            f"model you sample with ({model.variant} from {model.folder})."
        )


def is_blank(prompt: str | PromptTokens | None) -> bool:
    """Whether ``prompt`` is absent or blank (as a negative prompt: none); a blank :class:`PromptTokens` has no
    tokens (``encode_prompt(..., blank_allowed=True)``)."""
    if isinstance(prompt, PromptTokens):
        return prompt.ids.numel() == 0
    return prompt is None or (isinstance(prompt, str) and not prompt.strip())


def prompt_text(model: JanusModel, prompt: str | PromptTokens, what: str) -> str:
    """The text of ``prompt``; a :class:`PromptTokens` must have been built with ``model``."""
    if isinstance(prompt, PromptTokens):
        check_same_model(model, prompt.variant, prompt.model_folder, what)
        return prompt.text
    return prompt


def require_ar(model: JanusModel, task: str | None = None) -> None:
    """Raise for a JanusFlow ``model`` where VQ tokens are needed (``task`` names the job in the message)."""
    if not model.is_flow:
        return
    if task is None:
        raise JanusError("JanusFlow generates images with the flow sampler, not with VQ tokens; use the "
                         "'JanusFlow ODE Sampler' node (python -m janus_core flow; generate_flow_latents in Python) "
                         "for this model.")
    raise JanusError(f"{task} needs a Janus / Janus-Pro model (Janus-4o-7B for instruction edits): JanusFlow has no "
                     "VQ image tokenizer. For JanusFlow img2img, VAE Encode the image and give the latent to the "
                     "'JanusFlow ODE Sampler' node.")


def encode_prompt(model: JanusModel, text: str, what: str = "prompt", *, edit: bool = False,
                  blank_allowed: bool = False) -> PromptTokens:
    """Template ``text`` for text-to-image with the model's roles and tokenise it (``what`` names it in errors).

    Blank text is refused, or with ``blank_allowed`` (ComfyUI's Prompt Encoder) returned as a blank prompt with no
    tokens: the CFG pair builders take it as "no negative prompt" and refuse it as the prompt itself.

    ``edit``: the instruction-editing prompt instead (:func:`processor.editing_prompt`: the input image's feature
    placeholders and VQ-token pads before the instruction; AR models only). ``text`` stays text: special-token
    strings in it (``<|Assistant|>``, ``<begin_of_image>``, ...) are tokenised as plain characters; only the
    template's roles and image tags are special tokens.
    """
    if not isinstance(text, str):
        raise JanusError(f"Expected the {what} as text, a PromptTokens or a CFGPair, got {type(text).__name__} "
                         "(a FlowCFG belongs to a JanusFlow model and its flow sampler).")
    if blank_allowed and not text.strip():
        return PromptTokens(text, "", torch.empty(0, dtype=torch.long), model.variant, model_key(model))
    if edit:
        check_text(what, text, "say how the image should change")
        rows, cols = model.config.image_token_grid
        pieces = editing_prompt(model.variant, text, model.config.num_image_tokens, rows * cols)
        image_positions = rows * cols
    else:
        check_text(what, text, "describe the image you want")
        pieces = generation_prompt(model.variant, text)
        image_positions = IMAGE_TOKENS
    prompt_string = "".join(pieces)
    ids = torch.tensor(model.tokenizer.encode(pieces), dtype=torch.long)
    limit = model.config.llm.max_position_embeddings - image_positions
    if ids.numel() > limit:
        raise JanusError(f"The {what} is {ids.numel()} tokens long; at most {limit} fit before the "
                         f"{image_positions} image positions. Shorten it.")
    return PromptTokens(text, prompt_string, ids, model.variant, model_key(model))
