"""Janus Model Loader node and the ``DSJANUS_MODEL`` handle it outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from janus_core.hub import KNOWN_REPOS, is_model_folder, known_name, resolve_model_path
from janus_core.llm import work_buffer_bytes
from janus_core.model import JanusModel, load_model

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

    def ready(self, memory_required: int = 0) -> JanusModel:
        """Load the weights onto the compute device (again, if ComfyUI offloaded them) and return the model.

        ``memory_required``: bytes the coming run needs beyond the weights (KV cache), so ComfyUI can make room.
        """
        comfy.ensure_loaded(self.patcher, self.model.net, self.device, memory_required)
        self.model.pack_projections()  # a (re)load moves parameters one by one, which un-joins them
        return self.model

    def __repr__(self) -> str:
        return f"JanusModelHandle({self.model!r})"


def forward_buffer_bytes(model: JanusModel, rows: int, tokens: int) -> int:
    """Bytes of the LLM's work buffers for a forward over ``tokens`` new positions of ``rows`` sequences."""
    return work_buffer_bytes(model.config.llm, rows, tokens, model.dtype, model.device.type)


def kv_cache_bytes(model: JanusModel, rows: int, positions: int) -> int:
    """Bytes of the LLM's KV cache for ``rows`` sequences of ``positions`` tokens (the bulk of a run's memory)."""
    spec = model.config.llm
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * spec.num_hidden_layers * rows * spec.num_key_value_heads * spec.head_dim * positions * itemsize


def model_choices() -> list[str]:
    """Every sub-folder holding a config.json, plus known DeepSeek releases not on disk (marked download)."""
    found: list[str] = []
    for base in comfy.model_dirs():
        for name in comfy.find_model_folders(base):
            if name not in found:
                found.append(name)
    present = {known_name(Path(name).name) for name in found}
    missing = [short + DOWNLOAD_SUFFIX for short in KNOWN_REPOS if short not in present]
    return found + missing


def local_model_folder(model: str) -> Path | None:
    """The folder on disk for a combo value or absolute path, or None when it must be downloaded.

    Order: an absolute model folder; ``<models dir>/<value>``; for a known release (``Janus-Pro-1B``, also
    with the ``(download)`` mark), any listed folder of that name, e.g. ``models/Janus/deepseek-ai/Janus-Pro-1B``.
    """
    name = model.removesuffix(DOWNLOAD_SUFFIX).strip()
    path = Path(name).expanduser()
    if path.is_absolute():
        return path if is_model_folder(path) else None
    if any(comfy.skipped_folder(part) for part in path.parts):
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
        """Accept listed names, known releases (downloaded on first run) and absolute model folder paths."""
        name = model.removesuffix(DOWNLOAD_SUFFIX).strip()
        if not name:
            return "No model chosen: pick a folder from models/Janus or a '(download)' entry."
        path = Path(name).expanduser()
        if path.is_absolute():
            if is_model_folder(path):
                return True
            return f"'{name}' is not a model folder: it has no config.json (point to the checkpoint folder)."
        if known_name(name) or local_model_folder(name) is not None:
            return True
        where = ", ".join(map(str, comfy.model_dirs())) or "(no model folders; set JANUS_MODELS_DIR)"
        return f"Model '{model}' not found in {where}. Put the checkpoint folder there or pick a '(download)' entry."

    def load(self, model: str, dtype: str = "auto", variant: str = "auto"):
        path = local_model_folder(model)
        if path is None:  # a known release not on disk: download it now (only when chosen and run)
            path = resolve_model_path(model.removesuffix(DOWNLOAD_SUFFIX).strip(), comfy.model_dirs(),
                                      download_dir=comfy.download_dir())
        device = comfy.torch_device()
        # In ComfyUI the weights are read into the offload device; ready() moves them before each use. The
        # automatic precision is chosen for the device they run on.
        loaded = load_model(path, device=comfy.offload_device() if comfy.IN_COMFYUI else device,
                            dtype=DTYPES[dtype], variant=None if variant == "auto" else variant,
                            compute_device=device)
        return (JanusModelHandle(loaded, device),)
