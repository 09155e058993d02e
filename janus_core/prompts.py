"""Text-to-image prompts shared by the AR and flow samplers, and the check that inputs belong to a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import JanusError
from .model import JanusModel
from .processor import check_text, generation_prompt

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


def encode_prompt(model: JanusModel, text: str, what: str = "prompt") -> PromptTokens:
    """Template ``text`` for text-to-image with the model's roles and tokenise it (``what`` names it in errors).

    ``text`` stays text: special-token strings in it (``<|Assistant|>``, ``<begin_of_image>``, ...) are
    tokenised as plain characters; only the template's roles and ``<begin_of_image>`` are special tokens.
    """
    if not isinstance(text, str):
        raise JanusError(f"Expected the {what} as text, a PromptTokens or a CFGPair, got {type(text).__name__} "
                         "(a FlowCFG belongs to a JanusFlow model and its flow sampler).")
    check_text(what, text, "describe the image you want")
    pieces = generation_prompt(model.variant, text)
    prompt_string = "".join(pieces)
    ids = torch.tensor(model.tokenizer.encode(pieces), dtype=torch.long)
    limit = model.config.llm.max_position_embeddings - IMAGE_TOKENS
    if ids.numel() > limit:
        raise JanusError(f"The {what} is {ids.numel()} tokens long; at most {limit} fit before the "
                         f"{IMAGE_TOKENS} image positions. Shorten it.")
    return PromptTokens(text, prompt_string, ids, model.variant, model_key(model))
