"""The one place that talks to ComfyUI: model folders, memory management, progress, previews, cancel.

Every function degrades cleanly when ComfyUI is absent (plain Python, tests): folders come from the
``JANUS_MODELS_DIR`` environment variable, models move with plain ``.to(device)``, progress is logged
and cancel is never requested.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FOLDER_KEY = "Janus"
EXTRA_FOLDER_NAMES = ("Janus-Pro",)  # where users of other Janus packs already keep weights

try:  # ComfyUI is importable only inside a ComfyUI process
    import comfy.model_management as _mm
    import comfy.utils as _cu
    import folder_paths as _fp
except ImportError:  # pragma: no cover - exercised by the real-ComfyUI test
    _mm = _cu = _fp = None

IN_COMFYUI = _fp is not None


def register_model_folders() -> None:
    """Register ``models/Janus`` additively (entries from extra_model_paths.yaml are kept)."""
    if not IN_COMFYUI:
        return
    default = os.path.join(_fp.models_dir, FOLDER_KEY)
    _fp.add_model_folder_path(FOLDER_KEY, default, is_default=True)


def model_dirs() -> list[Path]:
    """Folders searched for checkpoints, in priority order."""
    dirs: list[Path] = []
    if IN_COMFYUI:
        dirs += [Path(p) for p in _fp.get_folder_paths(FOLDER_KEY)]
        dirs += [Path(_fp.models_dir) / name for name in EXTRA_FOLDER_NAMES]
    env = os.environ.get("JANUS_MODELS_DIR")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def download_dir() -> Path:
    """Where a chosen-but-absent known release is downloaded: the first ``models/Janus`` folder."""
    if IN_COMFYUI:
        return Path(_fp.get_folder_paths(FOLDER_KEY)[0])
    dirs = model_dirs()
    return dirs[0] if dirs else Path("models") / FOLDER_KEY


def torch_device() -> Any:
    """ComfyUI's compute device, or janus_core's default (CUDA, MPS, else CPU) outside ComfyUI."""
    if IN_COMFYUI:
        return _mm.get_torch_device()
    from janus_core.model import default_device

    return default_device()


def offload_device() -> Any:
    import torch

    return _mm.unet_offload_device() if IN_COMFYUI else torch.device("cpu")


def make_patcher(module: Any, load_device: Any) -> Any:
    """A ComfyUI ``ModelPatcher`` around ``module`` so ComfyUI can offload it; None outside ComfyUI."""
    if not IN_COMFYUI:
        return None
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device())


def ensure_loaded(patcher: Any, module: Any, device: Any) -> None:
    """Bring the weights to ``device`` before use (through ComfyUI's memory manager when present)."""
    if patcher is not None:
        _mm.load_models_gpu([patcher], force_full_load=True)
        return
    first = next(module.parameters())
    if first.device != device:
        module.to(device)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """Progress bar of the running node (ComfyUI's ProgressBar; also checks Cancel on every update)."""

    def __init__(self, total: int):
        self.total = total
        self._bar = _cu.ProgressBar(total) if IN_COMFYUI else None

    def update(self, value: int, preview: Any = None) -> None:
        """``value`` out of ``total``; ``preview`` is a PIL image or None."""
        check_interrupt()
        if self._bar is not None:
            payload = None
            if preview is not None:
                payload = ("JPEG", preview, preview_size())
            self._bar.update_absolute(value, self.total, payload)


def previews_enabled() -> bool:
    if not IN_COMFYUI:
        return False
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


def preview_size() -> int:
    if IN_COMFYUI:
        from comfy.cli_args import args

        return int(getattr(args, "preview_size", 512))
    return 512


def sdxl_latent_preview(latent: Any) -> Any:
    """PIL preview of a ``[1, 4, h, w]`` SDXL-space latent with ComfyUI's own previewer, or None."""
    if not IN_COMFYUI or not previews_enabled():
        return None
    import comfy.latent_formats
    import latent_preview

    previewer = latent_preview.get_previewer(latent.device, comfy.latent_formats.SDXL())
    if previewer is None:
        return None
    return previewer.decode_latent_to_preview_image("JPEG", latent)[1]


def soft_empty_cache() -> None:
    if IN_COMFYUI:
        _mm.soft_empty_cache()
