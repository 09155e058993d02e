"""Janus, Janus-Pro and JanusFlow from the command line: python -m janus_core SUBCOMMAND --help.

  generate    text-to-image with Janus-1.3B / Janus-Pro (as the "Janus AR Token Sampler" node)
  flow        text-to-image with JanusFlow-1.3B (as the "JanusFlow ODE Sampler" node + SDXL VAE)
  understand  answer a question about one or more images (as the "Janus Image Understanding" node)
  quantize    write an int8 / int4 copy of a checkpoint folder

--model takes a checkpoint folder, a folder name under --models-dir, or a known release (deepseek-ai/Janus-Pro-1B,
Janus-Pro-7B, Janus-1.3B, JanusFlow-1.3B, FreedomIntelligence/Janus-4o-7B), downloaded into --models-dir the first time.
Every mistake in the arguments or the files ends with one ERROR line saying what to do, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from .config import AR_VARIANTS
from .errors import JanusError
from .sampling import SEED_MAX

logger = logging.getLogger("janus_core")

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZED = ("int8", "int4")  # weight-only (janus_core.quant); everything else in the auto dtype
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one ERROR line (argparse prints the usage block and "error:" by default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"ERROR {self.prog}: {message}; see {self.prog} --help\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every option's default (none for unset / flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _number(cast: type, what: str, ok: Callable[[float], bool] = lambda _: True) -> Callable[[str], float]:
    """An argparse type: ``cast(text)`` if it is finite and ``ok``, else the message "'text' is not <what>"."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


POSITIVE_INT = _number(int, "a whole number >= 1", lambda v: v >= 1)
NON_NEGATIVE_INT = _number(int, "a whole number >= 0", lambda v: v >= 0)
SEED = _number(int, "a whole number in 0..2**64-1", lambda v: 0 <= v < 2**64)
REAL = _number(float, "a finite number")
NON_NEGATIVE_REAL = _number(float, "a number >= 0", lambda v: v >= 0)
PROBABILITY = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def _source(parser: argparse.ArgumentParser) -> None:
    """The options that say which checkpoint to use."""
    parser.add_argument("--model", required=True, help="checkpoint folder, or a known release such as "
                        "deepseek-ai/Janus-Pro-1B (downloaded into --models-dir when absent)")
    parser.add_argument("--models-dir", metavar="DIR", default=os.environ.get("JANUS_MODELS_DIR", "models/Janus"),
                        help="where model folders are looked up and downloaded ($JANUS_MODELS_DIR)")
    parser.add_argument("--variant", choices=["auto", *AR_VARIANTS], default="auto",
                        help="prompt roles: auto detects them from the checkpoint's tokenizer files; force "
                        "janus-pro (<|User|>) or janus-1.3b (User) for renamed or re-uploaded copies")


def _common(parser: argparse.ArgumentParser) -> None:
    _source(parser)
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", choices=[*DTYPES, *QUANTIZED], default="auto",
                        help="weight precision (auto: per component for the device and CPU class, see README; int8 / "
                        "int4: the language model and image-token head weight-only quantized, the rest auto; a "
                        "quantized folder loads in its own precision with auto)")
    parser.add_argument("--seed", type=SEED, metavar="N", default=0, help="image/answer i uses seed + i")


def _generation(parser: argparse.ArgumentParser, cfg_default: float) -> None:
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="what the image should show")
    parser.add_argument("--negative", default=None, metavar="TEXT",
                        help="negative prompt (replaces the unconditional row)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, metavar="N", default=1, help="images per run")
    parser.add_argument("--cfg-weight", type=REAL, metavar="X", default=cfg_default,
                        help="classifier-free guidance strength (1 = no guidance)")
    parser.add_argument("--out", default="outputs", metavar="DIR", help="folder for the PNG files")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m janus_core", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,flow,understand,quantize}")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    gen = command("generate", "text-to-image with Janus-1.3B / Janus-Pro (VQ tokens; not for JanusFlow: use flow)")
    _common(gen)
    _generation(gen, 5.0)
    gen.add_argument("--temperature", type=NON_NEGATIVE_REAL, metavar="X", default=1.0,
                     help="sampling temperature (> 0; 0 only with --top-k 1)")
    gen.add_argument("--top-k", type=NON_NEGATIVE_INT, metavar="N", default=0, help="0 = off, 1 = greedy")
    gen.add_argument("--top-p", type=PROBABILITY, metavar="X", default=1.0, help="nucleus sampling (1 = off)")

    flow = command("flow", "text-to-image with JanusFlow (rectified flow + SDXL VAE; needs: pip install diffusers)")
    _common(flow)
    _generation(flow, 2.0)
    flow.add_argument("--steps", type=POSITIVE_INT, metavar="N", default=30, help="ODE steps")
    flow.add_argument("--vae", metavar="PATH_OR_REPO", default="stabilityai/sdxl-vae",
                      help="diffusers SDXL VAE folder, or a repo id (taken from the Hugging Face cache, else "
                      "downloaded)")

    und = command("understand", "answer a question about one or more images")
    _common(und)
    und.add_argument("--image", action="append", required=True, metavar="FILE", help="image file (repeat for several)")
    und.add_argument("--question", metavar="TEXT", default="Describe this image in detail.", help="what to ask")
    und.add_argument("--all-images", action="store_true",
                     help="one answer about all images together instead of one per image")
    und.add_argument("--max-new-tokens", type=POSITIVE_INT, metavar="N", default=512, help="longest answer, in tokens")
    und.add_argument("--temperature", type=NON_NEGATIVE_REAL, metavar="X", default=0.0, help="0 = greedy")
    und.add_argument("--top-p", type=PROBABILITY, metavar="X", default=0.95,
                     help="nucleus sampling when temperature > 0")

    quant = command("quantize", "write a weight-only int8 / int4 copy of a checkpoint folder (loads without "
                    "quantizing again)")
    _source(quant)
    quant.add_argument("--dtype", choices=QUANTIZED, required=True, help="int8 or int4")
    quant.add_argument("--out", required=True, metavar="DIR", help="the new folder (must not exist)")
    quant.add_argument("--keep-lm-head", action="store_true",
                       help="keep lm_head (text answers) in its stored precision")
    quant.add_argument("--keep-embeddings", action="store_true",
                       help="keep the text-token embedding table in its stored precision")
    return parser


def _load(args: argparse.Namespace):
    """Resolve ``--model`` and load it, refusing a model of the wrong kind for ``args.command``.

    ``generate`` needs a Janus / Janus-Pro model, ``flow`` a JanusFlow model, ``understand`` takes either. A known
    release is checked by name before any download, a folder by its config.json before any weight is read.
    """
    from .config import load_config
    from .errors import JanusError
    from .hub import KNOWN_RELEASES, ModelKind, known_name, looks_like_path, resolve_model_path
    from .model import load_model

    uses = {ModelKind.AR: ("generate", "Janus AR Token Sampler"), ModelKind.FLOW: ("flow", "JanusFlow ODE Sampler")}
    needed = next((kind for kind, (command, _) in uses.items() if command == args.command), None)

    def refuse_unless_needed(kind: ModelKind) -> None:
        if needed is None or kind == needed:
            return
        command, node = uses[kind]
        raise JanusError(
            f"'{args.model}' is a {kind.value} model, but `{args.command}` needs a {needed.value} model. Use "
            f"`python -m janus_core {command}` for it (in ComfyUI: the {node} node), or pick a "
            f"{needed.value} model for `{args.command}`."
        )

    short = None if looks_like_path(args.model) else known_name(args.model)
    if short is not None:
        refuse_unless_needed(KNOWN_RELEASES[short].kind)
    models_dir = Path(args.models_dir)
    path = resolve_model_path(args.model, [models_dir], download_dir=models_dir)
    variant = None if args.variant == "auto" else args.variant
    refuse_unless_needed(ModelKind.of(load_config(path, variant=variant)))
    quantize = args.dtype if args.dtype in QUANTIZED else None
    return load_model(path, device=args.device, dtype=DTYPES.get(args.dtype), variant=variant, quantize=quantize)


class _LogProgress:
    """Logs progress every 10 %."""

    def __init__(self, what: str):
        self.what = what
        self.last = -1

    def __call__(self, done: int, total: int, *_: object) -> None:
        tenth = done * 10 // total
        if tenth != self.last:
            self.last = tenth
            logger.info("%s: %d/%d", self.what, done, total)


def _output_folder(out: str) -> Path:
    """``--out`` created and tried with a test file up front, so a bad folder fails before any model is loaded."""
    if not out.strip():
        raise JanusError("--out is empty; give a folder for the PNG files (e.g. --out outputs).")
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise JanusError(f"--out {out} is a file; give a folder for the PNG files.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise JanusError(f"--out {out}: cannot write into the folder ({exc.strerror or exc}); choose another "
                         "folder.") from exc
    return folder


def _free_path(folder: Path, stem: str) -> Path:
    """``<folder>/<stem>.png``, or ``<stem>_2.png``, ``_3``, ... when taken: earlier results are never
    overwritten."""
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.png"
    return path


def _save(images: torch.Tensor, folder: Path, stem: str, seed: int) -> list[Path]:
    """Image ``i`` as ``<stem>_<its seed>.png`` (the seed that regenerates it alone)."""
    from PIL import Image

    from .images import to_uint8

    paths = []
    for i, image in enumerate(to_uint8(images)):
        path = _free_path(folder, f"{stem}_{(seed + i) % (SEED_MAX + 1)}")
        try:
            Image.fromarray(image.numpy()).save(path)
        except OSError as exc:
            raise JanusError(f"Cannot write {path} ({exc.strerror or exc}); choose another --out folder.") from exc
        paths.append(path)
    return paths


def _open_images(paths: Sequence[str]) -> list:
    """Every ``--image`` file read as a PIL image, before any model is loaded."""
    from PIL import Image

    from .images import pil_to_rgb

    images = []
    for path in paths:
        file = Path(path).expanduser()
        if not file.is_file():
            problem = ("is a folder" if file.is_dir() else "is not a regular file" if file.exists() else
                       "does not exist")
            raise JanusError(f"--image {path} {problem}; give an image file (PNG, JPEG, WebP, ...).")
        try:
            with warnings.catch_warnings():  # large pictures are fine here: they are shrunk to 384 px
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(file)
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise JanusError(f"--image {path} is not an image Pillow can read ({type(exc).__name__}: {exc}); "
                             "give a PNG, JPEG or WebP file.") from exc
        try:  # pixels the model cannot take (e.g. float data outside 0..1), named by file before loading
            pil_to_rgb(image, (127, 127, 127))
        except JanusError as exc:
            raise JanusError(f"--image {path}: {exc}") from None
        images.append(image)
    return images


def _run_generate(args: argparse.Namespace) -> list[Path]:
    from .generate_ar import decode_image_tokens, generate_image_tokens

    folder = _output_folder(args.out)
    model = _load(args)
    progress = _LogProgress("image tokens")
    tokens = generate_image_tokens(model, args.prompt, batch_size=args.batch_size, seed=args.seed,
                                   cfg_weight=args.cfg_weight, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, negative_prompt=args.negative,
                                   callback=lambda step, total, _: progress(step + 1, total))
    return _save(decode_image_tokens(model, tokens), folder, "janus", args.seed)


def _run_flow(args: argparse.Namespace) -> list[Path]:
    from .generate_flow import build_flow_cfg, generate_flow_latents
    from .sdxl_vae import decode_latents, load_sdxl_vae

    folder = _output_folder(args.out)
    model = _load(args)
    pair = build_flow_cfg(model, args.prompt, args.batch_size, args.negative)  # refuses non-JanusFlow models
    vae = load_sdxl_vae(args.vae, device=model.device, dtype=model.precision.vae)
    latents = generate_flow_latents(model, pair, seed=args.seed, steps=args.steps, cfg_weight=args.cfg_weight,
                                    callback=_LogProgress("flow steps"))
    return _save(decode_latents(vae, latents), folder, "janusflow", args.seed)


def _run_understand(args: argparse.Namespace) -> list[str]:
    from .understanding import understand

    images = _open_images(args.image)
    model = _load(args)
    progress = _LogProgress("answer tokens")
    return understand(model, images, args.question, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      per_image=not args.all_images, callback=progress)


def _run_quantize(args: argparse.Namespace) -> Path:
    from .hub import resolve_model_path
    from .quant.folder import save_quantized

    models_dir = Path(args.models_dir)
    path = resolve_model_path(args.model, [models_dir], download_dir=models_dir)
    return save_quantized(path, Path(args.out), args.dtype, lm_head=not args.keep_lm_head,
                          embeddings=not args.keep_embeddings,
                          variant=None if args.variant == "auto" else args.variant)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a user error, 130 when interrupted)."""
    from .model import resolve_device

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        resolve_device(getattr(args, "device", None))  # before any download or load
        if args.command == "understand":
            answers = _run_understand(args)
            if len(answers) == 1:
                sys.stdout.write(answers[0].strip() + "\n")
            else:  # answers may span lines: each under a header naming its image
                for path, answer in zip(args.image, answers, strict=True):
                    sys.stdout.write(f"== {path} ==\n{answer.strip()}\n")
        elif args.command == "quantize":
            sys.stdout.write(f"{_run_quantize(args)}\n")
        else:
            runner = _run_generate if args.command == "generate" else _run_flow
            for path in runner(args):
                sys.stdout.write(f"{path}\n")
    except JanusError as exc:
        logger.error("%s", exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        logger.error("interrupted")
        return EXIT_INTERRUPTED
    return 0
