"""Janus Model Loader node and the ``DSJANUS_MODEL`` handle it outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from janus_core.errors import CheckpointError, JanusError
from janus_core.hub import KNOWN_RELEASES, download_model, escape_reason, is_model_folder, known_name
from janus_core.model import JanusModel, load_model

from . import comfy_services as comfy

logger = logging.getLogger(__name__)

DOWNLOAD_SUFFIX = " (download)"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Weight-only quantized precisions (janus_core.quant); the rest of the model and the matmuls use the auto dtype.
QUANTIZED = ("int8", "int4")
PRECISIONS = [*DTYPES, *QUANTIZED]
VARIANT_CHOICES = ["auto", "janus-pro", "janus-1.3b"]


class JanusModelHandle:
    """``DSJANUS_MODEL``: a loaded :class:`JanusModel` and ComfyUI's ``ModelPatcher`` for it (None outside).

    Call :meth:`ready` before every use: it (re)loads the weights to the compute device through ComfyUI's
    memory manager, which may have offloaded them for another model in between.
    """

    def __init__(self, model: JanusModel, device: torch.device):
        self.model = model
        self.device = device
        self.patcher = comfy.make_patcher(model.net, device)

    def ready(self, memory_required: int = 0) -> JanusModel:
        """Load the weights onto the compute device (again, if ComfyUI offloaded them) and return the model.

        ``memory_required``: bytes the coming run needs beyond the weights (janus_core's estimate of its KV cache
        and activations), so ComfyUI can make room. The library checks the same estimate against the free memory
        when the run starts, i.e. after this made room.
        """
        comfy.ensure_loaded(self.patcher, self.model.net, self.device, memory_required)
        # A (re)load moves parameters one by one, which un-joins them; quantized weights arriving on the compute
        # device for the first time are laid out for its kernels here.
        self.model.pack_projections()
        return self.model

    def __repr__(self) -> str:
        return f"JanusModelHandle({self.model!r})"


def model_choices() -> list[str]:
    """Every sub-folder holding a config.json, plus known releases not on disk (marked download)."""
    found: list[str] = []
    for base in comfy.model_dirs():
        for name in comfy.find_model_folders(base):
            if name not in found:
                found.append(name)
    present = {known_name(Path(name).name) for name in found}
    missing = [short + DOWNLOAD_SUFFIX for short in KNOWN_RELEASES if short not in present]
    return found + missing


def model_name(model: str) -> str:
    """The combo value without the ``(download)`` mark, as a ``/``-separated name inside the model folders.

    Raises CheckpointError for names that could leave the registered folders: absolute paths, drive letters,
    ``~``, ``.``/``..`` or empty parts.
    """
    if not isinstance(model, str):
        raise CheckpointError(f"The model must be a folder name (text), got {type(model).__name__}.")
    name = model.removesuffix(DOWNLOAD_SUFFIX).strip()
    if not name:
        raise CheckpointError("No model chosen: pick a folder from models/Janus or a '(download)' entry.")
    reason = escape_reason(name)
    if reason is not None:
        raise CheckpointError(
            f"Model name '{name}' {reason}: the loader only takes names inside the model folders "
            f"({_model_dirs_text()}). To use a checkpoint stored elsewhere, put a symlink to its folder there."
        )
    return name.replace("\\", "/")


def _model_dirs_text() -> str:
    return ", ".join(map(str, comfy.model_dirs())) or "none registered; set JANUS_MODELS_DIR"


def local_model_folder(model: str) -> Path | None:
    """The folder on disk for a combo value, or None when it must be downloaded (CheckpointError for bad names).

    Order: ``<models dir>/<value>``; for a known release (``Janus-Pro-1B``, also with the ``(download)`` mark),
    any listed folder of that name, e.g. ``models/Janus/deepseek-ai/Janus-Pro-1B``.
    """
    name = model_name(model)
    if any(comfy.skipped_folder(part) for part in name.split("/")):
        return None  # hidden folders and unfinished downloads are never models
    dirs = comfy.model_dirs()
    for base in dirs:
        if is_model_folder(base / name):
            return base / name
    short = known_name(name)
    if short is not None:
        for base in dirs:
            for rel in comfy.find_model_folders(base):
                if known_name(Path(rel).name) == short:
                    return base / rel
    return None


def _not_found(model: str) -> str:
    return (f"Model '{model}' not found in the model folders ({_model_dirs_text()}). Put the checkpoint folder "
            "there or pick a '(download)' entry.")


class DSJanusModelLoader:
    DESCRIPTION = (
        "Loads a DeepSeek Janus, Janus-Pro or JanusFlow checkpoint from the registered model folders: "
        "models/Janus, models/Janus-Pro, 'janus' entries of extra_model_paths.yaml and JANUS_MODELS_DIR. "
        "Names are relative to those folders; absolute paths and '..' are refused (put a symlink to a folder "
        "stored elsewhere into models/Janus). Entries marked (download) are fetched from Hugging Face into "
        "models/Janus/<name> the first time they run; an interrupted download stays in <name>.partial and "
        "resumes on the next run."
    )
    CATEGORY = "Janus"
    RETURN_TYPES = ("DSJANUS_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "Checkpoint folder (holding config.json) inside the model "
                                            "folders. '(download)' entries are downloaded into models/Janus on "
                                            "first use and resume if interrupted."}),
                "dtype": (PRECISIONS, {"default": "auto", "tooltip": "Weight precision. auto: chosen per component "
                                       "for the device (bf16 on GPUs and CPUs with bf16 instructions, fp16 on "
                                       "older GPUs with the VQ decoder in fp32, fp32 convolutions on CPUs that "
                                       "emulate bf16). int8 / int4: the language model and image-token head "
                                       "quantized (weight-only), the rest as auto. int8: about 55% of the bf16 "
                                       "memory for 7B, small quality cost, decodes faster than bf16 on most "
                                       "CPUs. int4: about 35%, visible quality cost, faster at batch 1 but "
                                       "slower than bf16 at large batches on CPUs. A quantized folder loads in "
                                       "its own precision with auto."}),
                "variant": (VARIANT_CHOICES, {"default": "auto", "tooltip": "Prompt roles. auto detects from "
                                              "the checkpoint; force janus-1.3b (User/Assistant) or janus-pro "
                                              "(<|User|>/<|Assistant|>) for renamed or re-uploaded copies."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str) -> bool | str:
        """Accept folders inside the model folders and known releases (downloaded on first run)."""
        try:
            if local_model_folder(model) is not None or known_name(model_name(model)):
                return True
        except CheckpointError as exc:
            return str(exc)
        return _not_found(model)

    def load(self, model: str, dtype: str = "auto", variant: str = "auto"):
        path = local_model_folder(model)
        if path is None:  # a known release not on disk: download it now (only when chosen and run)
            short = known_name(model_name(model))
            if short is None:
                raise CheckpointError(_not_found(model))
            path = download_model(KNOWN_RELEASES[short].repo_id, comfy.download_dir() / short)
        device = comfy.torch_device()
        if dtype not in PRECISIONS:
            raise JanusError(f"Unknown precision '{dtype}'; choose one of {', '.join(PRECISIONS)}.")
        # In ComfyUI the weights are read into the offload device; ready() moves them before each use (and lays
        # quantized weights out for the compute device's kernels there).
        loaded = load_model(path, device=comfy.offload_device() if comfy.IN_COMFYUI else device,
                            dtype=DTYPES.get(dtype), variant=None if variant == "auto" else variant,
                            quantize=dtype if dtype in QUANTIZED else None, compute_device=device)
        return (JanusModelHandle(loaded, device),)
