"""Janus Model Loader node and the ``DSJANUS_MODEL`` handle it outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from janus_core.hub import KNOWN_REPOS, is_model_folder, known_name, resolve_model_path
from janus_core.model import JanusModel, default_dtype, load_model

from . import comfy_services as comfy

logger = logging.getLogger(__name__)

DOWNLOAD_SUFFIX = " (download)"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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

    def ready(self) -> JanusModel:
        comfy.ensure_loaded(self.patcher, self.model.net, self.device)
        return self.model

    def __repr__(self) -> str:
        return f"JanusModelHandle({self.model!r})"


def model_choices() -> list[str]:
    """Every sub-folder holding a config.json, plus known DeepSeek releases not on disk (marked download)."""
    found: list[str] = []
    for base in comfy.model_dirs():
        if not base.is_dir():
            continue
        for config in sorted(base.rglob("config.json")):
            folder = config.parent
            if folder == base or ".partial" in folder.name or folder.parent.name == "vae":
                continue
            name = folder.relative_to(base).as_posix()
            if name not in found:
                found.append(name)
    present = {known_name(Path(name).name) for name in found}
    missing = [short + DOWNLOAD_SUFFIX for short in KNOWN_REPOS if short not in present]
    return found + missing


class DSJanusModelLoader:
    DESCRIPTION = (
        "Loads a DeepSeek Janus, Janus-Pro or JanusFlow checkpoint from models/Janus (or models/Janus-Pro). "
        "Entries marked (download) are fetched from Hugging Face into models/Janus/<name> the first time "
        "they run. An absolute folder path also works."
    )
    CATEGORY = "Janus"
    RETURN_TYPES = ("DSJANUS_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "Checkpoint folder (holding config.json). '(download)' "
                                            "entries are downloaded into models/Janus on first use."}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "Weight precision. auto: bf16 on GPUs "
                                         "that support it, else fp16 (VQ decoder kept fp32); bf16 on CPU."}),
                "variant": (VARIANT_CHOICES, {"default": "auto", "tooltip": "Prompt roles. auto detects from "
                                              "the checkpoint; force janus-1.3b (User/Assistant) or janus-pro "
                                              "(<|User|>/<|Assistant|>) for renamed or re-uploaded copies."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model: str) -> bool | str:
        """Accept listed names, '(download)' names even after the download, and absolute folder paths."""
        name = model.removesuffix(DOWNLOAD_SUFFIX)
        if known_name(name) or Path(name).is_absolute() or name in model_choices():
            return True
        return f"Model '{model}' not found in {', '.join(map(str, comfy.model_dirs()))}"

    def load(self, model: str, dtype: str = "auto", variant: str = "auto"):
        name = model.removesuffix(DOWNLOAD_SUFFIX)
        path = Path(name)
        if not (path.is_absolute() and is_model_folder(path)):
            path = resolve_model_path(name, comfy.model_dirs(), download_dir=comfy.download_dir())
        device = comfy.torch_device()
        torch_dtype = DTYPES[dtype] or default_dtype(device)
        loaded = load_model(path, device=comfy.offload_device() if comfy.IN_COMFYUI else device,
                            dtype=torch_dtype, variant=None if variant == "auto" else variant)
        return (JanusModelHandle(loaded, device),)
