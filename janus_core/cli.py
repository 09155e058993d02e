"""Command line: ``python -m janus_core {generate,flow,understand} ...``.

``--model`` takes a checkpoint folder, a folder name under ``--models-dir``, or a known DeepSeek release
(``deepseek-ai/Janus-Pro-1B``, ``Janus-Pro-7B``, ``Janus-1.3B``, ``JanusFlow-1.3B``), downloaded into
``--models-dir`` the first time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger("janus_core")

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder, or a known release such as "
                        "deepseek-ai/Janus-Pro-1B (downloaded into --models-dir when absent)")
    parser.add_argument("--models-dir", default=os.environ.get("JANUS_MODELS_DIR", "models/Janus"),
                        help="where model folders are looked up and downloaded (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="weight precision (auto: bf16, or fp16 on GPUs without bf16)")
    parser.add_argument("--seed", type=int, default=0, help="image/answer i uses seed + i")


def _generation(parser: argparse.ArgumentParser, cfg_default: float) -> None:
    parser.add_argument("--prompt", required=True, help="what the image should show")
    parser.add_argument("--negative", default=None, help="negative prompt (replaces the unconditional row)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--cfg-weight", type=float, default=cfg_default)
    parser.add_argument("--out", default="outputs", help="folder for the PNG files (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m janus_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text-to-image with Janus / Janus-Pro (VQ tokens)")
    _common(gen)
    _generation(gen, 5.0)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off, 1 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)

    flow = sub.add_parser("flow", help="text-to-image with JanusFlow (rectified flow + SDXL VAE)")
    _common(flow)
    _generation(flow, 2.0)
    flow.add_argument("--steps", type=int, default=30)
    flow.add_argument("--vae", default="stabilityai/sdxl-vae",
                      help="diffusers SDXL VAE folder or repo id (needs: pip install diffusers)")

    und = sub.add_parser("understand", help="answer a question about one or more images")
    _common(und)
    und.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    und.add_argument("--question", default="Describe this image in detail.")
    und.add_argument("--all-images", action="store_true",
                     help="one answer about all images together instead of one per image")
    und.add_argument("--max-new-tokens", type=int, default=512)
    und.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    und.add_argument("--top-p", type=float, default=0.95)
    return parser


def _load(args: argparse.Namespace):
    from .hub import resolve_model_path
    from .model import load_model

    models_dir = Path(args.models_dir)
    path = resolve_model_path(args.model, [models_dir], download_dir=models_dir)
    return load_model(path, device=args.device, dtype=DTYPES[args.dtype])


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


def _save(images: torch.Tensor, out: str, stem: str, seed: int) -> list[Path]:
    from PIL import Image

    from .images import to_uint8

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_uint8(images)):
        path = folder / f"{stem}_{seed + i}.png"
        Image.fromarray(image.numpy()).save(path)
        paths.append(path)
    return paths


def _run_generate(args: argparse.Namespace) -> list[Path]:
    from .generate_ar import decode_image_tokens, generate_image_tokens

    model = _load(args)
    progress = _LogProgress("image tokens")
    tokens = generate_image_tokens(model, args.prompt, batch_size=args.batch_size, seed=args.seed,
                                   cfg_weight=args.cfg_weight, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, negative_prompt=args.negative,
                                   callback=lambda step, total, _: progress(step + 1, total))
    return _save(decode_image_tokens(model, tokens), args.out, "janus", args.seed)


def _run_flow(args: argparse.Namespace) -> list[Path]:
    from .generate_flow import generate_flow_latents
    from .sdxl_vae import decode_latents, load_sdxl_vae

    model = _load(args)
    vae = load_sdxl_vae(args.vae, device=model.device, dtype=model.precision.vae)
    latents = generate_flow_latents(model, args.prompt, batch_size=args.batch_size, seed=args.seed,
                                    steps=args.steps, cfg_weight=args.cfg_weight, negative_prompt=args.negative,
                                    callback=_LogProgress("flow steps"))
    return _save(decode_latents(vae, latents), args.out, "janusflow", args.seed)


def _run_understand(args: argparse.Namespace) -> list[str]:
    from PIL import Image

    from .understanding import understand

    model = _load(args)
    images = [Image.open(path) for path in args.image]
    progress = _LogProgress("answer tokens")
    return understand(model, images, args.question, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      per_image=not args.all_images, callback=progress)


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import JanusError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "understand":
            for answer in _run_understand(args):
                sys.stdout.write(answer.strip() + "\n")
        else:
            runner = _run_generate if args.command == "generate" else _run_flow
            for path in runner(args):
                sys.stdout.write(f"{path}\n")
    except JanusError as exc:
        logger.error("%s", exc)
        return 2
    return 0
