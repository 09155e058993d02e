"""Tokenizer, conversation template and image preprocessing, exactly as DeepSeek's processor.

Prompt format (``SeparatorStyle.DeepSeek``): ``[system + "\\n\\n"] + role + ": " + message + "\\n\\n" +
assistant_role + ":"``, stripped; the role strings depend on the variant (``User``/``Assistant`` for
Janus-1.3B and JanusFlow, ``<|User|>``/``<|Assistant|>`` for Janus-Pro). Token ids are always looked up
by string in the checkpoint's own ``tokenizer.json``.

User text is text: prompts are built as pieces, where only :class:`Markup` pieces added by this code (roles,
image tags) may become special tokens. Prompts, negative prompts, questions and system prompts are
tokenised with every special token read as plain characters, so ``<|Assistant|>`` or
``<image_placeholder>`` typed by a user cannot open a chat turn or claim an image slot.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .config import MAX_IMAGE_SIZE
from .errors import CheckpointError, JanusError
from .images import ImagesArg, pil_to_rgb, to_pil_images
from .jsonfile import MAX_JSON_BYTES, JsonFields, read_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer

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
# Janus's own markup: never produced from user text, even where a tokenizer.json forgets to mark it special
MARKUP_TOKENS = (BOS, EOS, PAD, IMAGE_TAG, IMAGE_START, IMAGE_END, *ROLES["janus-pro"])

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


class Markup(str):
    """A prompt piece written by this code (a role, an image tag): it becomes its special token when the
    tokenizer has one. Every other ``str`` piece of a prompt is text and never becomes a special token."""

    __slots__ = ()


# The oldest tokenizers library that reads tokenizer.json files written by current ones (BPE merges stored as
# pairs); older ones fail with "data did not match any variant of untagged enum ModelWrapper".
MIN_TOKENIZERS = (0, 20)


def _unreadable_tokenizer(path: Path, exc: Exception) -> JanusError:
    """The error for a tokenizer.json the tokenizers library could not parse: an outdated library, or a broken
    file."""
    import tokenizers

    version = getattr(tokenizers, "__version__", "0")
    if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < MIN_TOKENIZERS:
        minimum = ".".join(map(str, MIN_TOKENIZERS))
        return JanusError(
            f"The installed tokenizers library ({version}) is too old to read {path} ({str(exc)[:120]}): it needs "
            f"tokenizers >= {minimum}. Run: pip install -U \"tokenizers>={minimum}\" \"transformers>=4.45\" (in "
            "ComfyUI's Python environment)."
        )
    return CheckpointError(f"{path} is not a valid tokenizer ({str(exc)[:200]}); re-download the checkpoint.")


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
            raise _unreadable_tokenizer(path, exc) from exc
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

    @cached_property
    def _text_tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer that reads special tokens as plain characters.

        "Special" = what ``tokenizer.json`` declares special, plus :data:`MARKUP_TOKENS` wherever they are
        added tokens. Ordinary added tokens (e.g. DeepSeek's single-character ones) behave as in the original.
        """
        from tokenizers import AddedToken, Tokenizer

        text = Tokenizer.from_str(self._tok.to_str())
        added = {token.content for token in text.get_added_tokens_decoder().values()}
        text.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MARKUP_TOKENS if t in added])
        text.encode_special_tokens = True
        return text

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        """Special token string -> id (the tokens :class:`Markup` pieces may become)."""
        decoder = self._text_tokenizer.get_added_tokens_decoder()
        return {token.content: tid for tid, token in decoder.items() if token.special}

    def encode(self, pieces: str | Sequence[str]) -> list[int]:
        """Token ids of a prompt, BOS first.

        ``pieces``: one string or a sequence of them. A :class:`Markup` piece that is a special token of this
        tokenizer becomes that token; everything else is text, special-token strings included. The text
        between two special tokens is tokenised as one run, so a prompt without user-typed special-token
        strings gets exactly the ids the original gets for the joined string.
        """
        pieces = [pieces] if isinstance(pieces, str) else pieces
        ids, run = [self.bos_id], []
        for piece in pieces:
            special = self._special_ids.get(piece) if isinstance(piece, Markup) else None
            if special is None:
                run.append(piece)
            else:
                ids += self._text_ids("".join(run)) + [special]
                run = []
        return ids + self._text_ids("".join(run))

    def _text_ids(self, text: str) -> list[int]:
        return self._text_tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=True)



def check_text(what: str, text: object, empty_hint: str | None = None) -> None:
    """Refuse user text the tokenizer cannot take: not a ``str``, or not valid Unicode (lone surrogates);
    with ``empty_hint`` (what to type instead), also blank text."""
    if not isinstance(text, str):
        raise JanusError(f"The {what} must be text (str), got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JanusError(f"The {what} contains a character that is not valid Unicode (position {exc.start}, "
                         f"{text[exc.start]!r}); remove or retype it.") from None
    if empty_hint is not None and not text.strip():
        raise JanusError(f"The {what} is empty; {empty_hint}.")


def check_question(question: object) -> None:
    """Refuse a question that is not usable text (see :func:`check_text`)."""
    check_text("question", question, "type what you want to know about the image(s)")


def _strip(pieces: list[str]) -> list[str]:
    """``"".join(pieces).strip()`` done piece by piece, so each piece keeps its kind (text or Markup)."""
    out = [p for p in pieces if p]
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    if out:
        out[0] = type(out[0])(out[0].lstrip())
        out[-1] = type(out[-1])(out[-1].rstrip())
    return out


def format_prompt(variant: str, message: str | Sequence[str], system_prompt: str = "") -> list[str]:
    """One user turn followed by the open assistant turn, in the variant's SFT template, as prompt pieces.

    ``message``: user text, or pieces (:class:`Markup` image tags and text). The roles are :class:`Markup`;
    the system prompt and the message text stay text. ``"".join(pieces)`` is DeepSeek's prompt string.
    """
    user, assistant = ROLES[variant]
    pieces = [system_prompt, "\n\n"] if system_prompt else []
    pieces += [Markup(user), ": ", *_strip([message] if isinstance(message, str) else list(message)), "\n\n",
               Markup(assistant), ":"]
    return _strip(pieces)


def generation_prompt(variant: str, prompt: str) -> list[str]:
    """Text-to-image prompt pieces: template with an empty system prompt, then ``<begin_of_image>``."""
    return format_prompt(variant, prompt, system_prompt="") + [Markup(IMAGE_START)]


def editing_prompt(variant: str, instruction: str, understanding_tokens: int, image_tokens: int) -> list[str]:
    """Instruction-editing prompt pieces (Janus-4o): the input image twice, then the instruction, in the
    text-to-image template.

    The user turn is ``<begin_of_image>`` + ``understanding_tokens`` x ``<image_placeholder>`` (for the SigLIP
    features) + ``<end_of_image>``, ``<begin_of_image>`` + ``image_tokens`` x pad (for the VQ tokens) +
    ``<end_of_image>``, then the instruction (text); the prompt ends with ``<begin_of_image>``.
    """
    features = [Markup(IMAGE_START), *[Markup(IMAGE_TAG)] * understanding_tokens, Markup(IMAGE_END)]
    tokens = [Markup(IMAGE_START), *[Markup(PAD)] * image_tokens, Markup(IMAGE_END)]
    return format_prompt(variant, [*features, *tokens, instruction], system_prompt="") + [Markup(IMAGE_START)]


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
        if not path.exists() and not path.is_symlink():
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

    def fitted_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` an image of that size is resized to: the long side to ``image_size``, the short
        side in proportion (truncated, at least ``min_size``)."""
        longest = max(width, height)
        return (max(int(width / longest * self.image_size), self.min_size),
                max(int(height / longest * self.image_size), self.min_size))

    def resize_and_pad(self, image: Image.Image) -> Image.Image:
        """PIL image (any mode, see :func:`images.pil_to_rgb`) -> square ``image_size`` RGB PIL image (long
        side fitted, short side padded grey, the picture centred: ``((side - w) // 2, (side - h) // 2)``)."""
        image = pil_to_rgb(image, self.background)
        new_w, new_h = self.fitted_size(*image.size)
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

    def batch(self, images: ImagesArg) -> torch.Tensor:
        """PIL images (any mode) or an IMAGE tensor ``[N, H, W, 3]`` (rules: :mod:`janus_core.images`) -> pixel
        values ``[N, 3, image_size, image_size]`` float32 on the CPU."""
        return torch.stack([self(image) for image in to_pil_images(images, self.background)])


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

    Each image is an ``<image_placeholder>`` :class:`Markup` tag, which becomes ``<begin_of_image>`` +
    ``num_image_tokens`` placeholders + ``<end_of_image>``; tags typed in the question or system prompt are
    plain text. ``image_mask`` covers the placeholders, and for JanusFlow also each ``<begin_of_image>``
    (which receives the learned begin-of-understanding embedding). ``system_prompt`` None = DeepSeek's.
    """
    check_question(question)
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    check_text("system prompt", system)
    pieces = format_prompt(variant, [Markup(IMAGE_TAG), "\n"] * num_images + [question], system_prompt=system)
    expanded: list[int] = []
    for tid in tokenizer.encode(pieces):
        if tid == tokenizer.image_id:
            expanded += [tokenizer.image_start_id] + [tokenizer.image_id] * num_image_tokens + [tokenizer.image_end_id]
        else:
            expanded.append(tid)
    input_ids = torch.tensor(expanded, dtype=torch.long)
    image_mask = input_ids == tokenizer.image_id
    if variant == "janusflow":
        image_mask |= input_ids == tokenizer.image_start_id
    return UnderstandingInputs(input_ids, image_mask, num_images, "".join(pieces))
