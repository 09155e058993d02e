"""Tokenizer, conversation template and image preprocessing, exactly as DeepSeek's processor.

Prompt format (``SeparatorStyle.DeepSeek``): ``[system + "\\n\\n"] + role + ": " + message + "\\n\\n" +
assistant_role + ":"``, stripped; the role strings depend on the variant (``User``/``Assistant`` for
Janus-1.3B and JanusFlow, ``<|User|>``/``<|Assistant|>`` for Janus-Pro). Token ids are always looked up
by string in the checkpoint's own ``tokenizer.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import MAX_IMAGE_SIZE
from .errors import CheckpointError, JanusError
from .jsonfile import MAX_JSON_BYTES, JsonFields, read_json

logger = logging.getLogger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_TAG = "<image_placeholder>"
IMAGE_START = "<begin_of_image>"
IMAGE_END = "<end_of_image>"

ROLES = {
    "janus-1.3b": ("User", "Assistant"),
    "janus-pro": ("<|User|>", "<|Assistant|>"),
    "janusflow": ("User", "Assistant"),
}

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


class JanusTokenizer:
    """The checkpoint's ``tokenizer.json`` with the special-token ids Janus needs.

    ``encode`` prepends BOS (as the original ``LlamaTokenizerFast`` does); ``decode`` drops special tokens.
    """

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{Path(folder)} has no tokenizer.json; re-download the checkpoint.")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is too large to be a tokenizer ({path.stat().st_size} bytes); "
                                  "re-download the checkpoint.")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library reports every parse error as a plain Exception
            raise CheckpointError(
                f"{path} is not a valid tokenizer ({str(exc)[:200]}); re-download the checkpoint."
            ) from exc
        ids = {}
        for name in (BOS, EOS, PAD, IMAGE_TAG, IMAGE_START, IMAGE_END):
            tid = self._tok.token_to_id(name)
            if tid is None:
                raise CheckpointError(
                    f"tokenizer.json in {folder} lacks the special token {name!r} that Janus needs; it is "
                    "not a Janus tokenizer or an outdated revision. Re-download the checkpoint."
                )
            ids[name] = tid
        self.bos_id = ids[BOS]
        self.eos_id = ids[EOS]
        self.pad_id = ids[PAD]
        self.image_id = ids[IMAGE_TAG]
        self.image_start_id = ids[IMAGE_START]
        self.image_end_id = ids[IMAGE_END]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with BOS first."""
        return [self.bos_id] + self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=True)



def format_prompt(variant: str, user_message: str, system_prompt: str = "") -> str:
    """One user turn followed by the open assistant turn, in the variant's SFT template."""
    user, assistant = ROLES[variant]
    text = (system_prompt + "\n\n") if system_prompt else ""
    text += f"{user}: {user_message.strip()}\n\n{assistant}:"
    return text.strip()


def generation_prompt(variant: str, prompt: str) -> str:
    """Text-to-image prompt string: template with an empty system prompt, then ``<begin_of_image>``."""
    return format_prompt(variant, prompt, system_prompt="") + IMAGE_START


@dataclass(frozen=True)
class ImagePreprocessor:
    """``VLMImageProcessor``: long side to ``image_size`` (bicubic, antialiased), pad square, normalise."""

    image_size: int = 384
    min_size: int = 14
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True

    @classmethod
    def from_folder(cls, folder: str | Path) -> ImagePreprocessor:
        """The settings of ``<folder>/preprocessor_config.json`` (defaults when the file is absent)."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        fields = JsonFields(str(path), "", read_json(path))
        d = cls()
        image_size = fields.integer("image_size", 1, MAX_IMAGE_SIZE, d.image_size)
        return cls(
            image_size=image_size,
            min_size=fields.integer("min_size", 1, image_size, d.min_size),
            image_mean=fields.numbers("image_mean", 0.0, 1.0, 3, d.image_mean, open_low=False),
            image_std=fields.numbers("image_std", 0.0, 1e6, 3, d.image_std),
            rescale_factor=fields.number("rescale_factor", 0.0, 1.0, d.rescale_factor),
            do_normalize=fields.flag("do_normalize", d.do_normalize),
        )

    @property
    def background(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.image_mean)

    def resize_and_pad(self, image: Image.Image) -> Image.Image:
        """RGB PIL image -> square ``image_size`` PIL image (long side fitted, short side padded grey)."""
        image = image.convert("RGB")
        width, height = image.size
        longest = max(width, height)
        new_h = max(int(height / longest * self.image_size), self.min_size)
        new_w = max(int(width / longest * self.image_size), self.min_size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if new_w == new_h:
            return image
        side = max(new_w, new_h)
        canvas = Image.new("RGB", (side, side), self.background)
        canvas.paste(image, ((side - new_w) // 2, (side - new_h) // 2))
        return canvas

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> pixel values ``[3, image_size, image_size]`` float32 (in [-1, 1] by default)."""
        arr = np.asarray(self.resize_and_pad(image))
        x = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            x = (x - mean) / std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@dataclass
class UnderstandingInputs:
    """One prompt with its images: ``input_ids [T]``, ``image_mask [T]`` (positions filled by image features)."""

    input_ids: torch.Tensor
    image_mask: torch.Tensor
    num_images: int
    prompt: str


def understanding_inputs(tokenizer: JanusTokenizer, variant: str, question: str, num_images: int,
                         num_image_tokens: int = 576, system_prompt: str | None = None) -> UnderstandingInputs:
    """Token ids of an understanding prompt with ``num_images`` images before ``question``.

    Each ``<image_placeholder>`` becomes ``<begin_of_image>`` + ``num_image_tokens`` placeholders +
    ``<end_of_image>``. ``image_mask`` covers the placeholders, and for JanusFlow also each
    ``<begin_of_image>`` (which receives the learned begin-of-understanding embedding).
    """
    if not question or not question.strip():
        raise JanusError("The question is empty; type what you want to know about the image(s).")
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    message = IMAGE_TAG + "\n"
    prompt = format_prompt(variant, message * num_images + question, system_prompt=system)
    ids = tokenizer.encode(prompt)
    expanded: list[int] = []
    for tid in ids:
        if tid == tokenizer.image_id:
            expanded += [tokenizer.image_start_id] + [tokenizer.image_id] * num_image_tokens + [tokenizer.image_end_id]
        else:
            expanded.append(tid)
    found = ids.count(tokenizer.image_id)
    if found != num_images:
        raise JanusError(
            f"The question contains {found - num_images} extra '{IMAGE_TAG}' tag(s); remove them, images are "
            "inserted automatically."
        )
    input_ids = torch.tensor(expanded, dtype=torch.long)
    image_mask = input_ids == tokenizer.image_id
    if variant == "janusflow":
        image_mask |= input_ids == tokenizer.image_start_id
    return UnderstandingInputs(input_ids, image_mask, num_images, prompt)
