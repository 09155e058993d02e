"""The one place that talks to ComfyUI: model folders, memory management, progress, previews, cancel.

Every function degrades cleanly when ComfyUI is absent (plain Python, tests): folders come from the
``JANUS_MODELS_DIR`` environment variable, models move with plain ``.to(device)``, progress is logged
and cancel is never requested.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from janus_core.hub import PARTIAL_SUFFIX

logger = logging.getLogger(__name__)

FOLDER_KEY = "Janus"
EXTRA_FOLDER_NAMES = ("Janus-Pro",)  # where users of other Janus packs already keep weights
# folder_paths keys are case-sensitive; extra_model_paths.yaml users write any of these.
FOLDER_KEY_ALIASES = ("janus", "janus-pro", "janus_pro")
MAX_DEPTH = 3  # models/Janus/<name> or models/Janus/<org>/<name> (one more level for safety)

try:  # ComfyUI is importable only inside a ComfyUI process
    import comfy.model_management as _mm
    import comfy.utils as _cu
    import folder_paths as _fp
except ImportError:  # pragma: no cover - exercised by the real-ComfyUI test
    _mm = _cu = _fp = None

IN_COMFYUI = _fp is not None


def register_model_folders() -> None:
    """Register ``models/Janus`` with ``folder_paths`` additively.

    Folders already registered under ``Janus`` (``extra_model_paths.yaml`` is read before custom nodes load)
    are kept. ``models/Janus`` goes first, as ComfyUI's own ``models/<kind>`` folders do, so downloads land in
    ``models/Janus/<name>``.
    """
    if not IN_COMFYUI:
        return
    _fp.add_model_folder_path(FOLDER_KEY, os.path.join(_fp.models_dir, FOLDER_KEY), is_default=True)


def _registered_dirs() -> list[Path]:
    """Folders ComfyUI knows for Janus: the ``Janus`` key first, then alias keys, then ``models/Janus-Pro``."""
    dirs = [Path(p) for p in _fp.get_folder_paths(FOLDER_KEY)] if FOLDER_KEY in _fp.folder_names_and_paths else []
    for key in list(_fp.folder_names_and_paths):
        if key != FOLDER_KEY and key.lower() in FOLDER_KEY_ALIASES:
            dirs += [Path(p) for p in _fp.get_folder_paths(key)]
    dirs += [Path(_fp.models_dir) / name for name in EXTRA_FOLDER_NAMES]
    return dirs


def model_dirs() -> list[Path]:
    """Folders searched for checkpoints, in priority order (ComfyUI's, then ``JANUS_MODELS_DIR`` entries)."""
    dirs: list[Path] = _registered_dirs() if IN_COMFYUI else []
    env = os.environ.get("JANUS_MODELS_DIR")
    if env:
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def skipped_folder(name: str) -> bool:
    """Folders never listed as models: hidden ones and unfinished downloads."""
    return name.startswith(".") or name.endswith(PARTIAL_SUFFIX) or name == "__pycache__"


def find_model_folders(base: Path, max_depth: int = MAX_DEPTH) -> list[str]:
    """Sub-folders of ``base`` holding a ``config.json``, as ``/``-separated relative names, sorted.

    Follows symlinked folders, skips hidden folders and unfinished downloads (``*.partial``), and does not
    descend into a model folder (so JanusFlow's ``vae/`` sub-folder is not listed as a model).
    """
    found: list[str] = []

    def walk(folder: Path, rel: tuple[str, ...]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name.lower())
        except OSError:
            return
        for entry in entries:
            if skipped_folder(entry.name):
                continue
            try:
                if not entry.is_dir():  # follows symlinks
                    continue
            except OSError:
                continue
            path = Path(entry.path)
            if (path / "config.json").is_file():
                found.append("/".join((*rel, entry.name)))
            elif len(rel) + 1 < max_depth:
                walk(path, (*rel, entry.name))

    if base.is_dir():
        walk(base, ())
    return found


def download_dir() -> Path:
    """Where a chosen-but-absent known release is downloaded: the first registered ``Janus`` folder."""
    dirs = model_dirs()
    if dirs:
        return dirs[0]
    return Path("models") / FOLDER_KEY


def torch_device() -> Any:
    """ComfyUI's compute device, or janus_core's default (CUDA, MPS, else CPU) outside ComfyUI."""
    if IN_COMFYUI:
        return _mm.get_torch_device()
    from janus_core.model import default_device

    return default_device()


def offload_device() -> Any:
    """Where ComfyUI parks weights it is not using (the CPU unless --gpu-only / --highvram)."""
    import torch

    return _mm.unet_offload_device() if IN_COMFYUI else torch.device("cpu")


def make_patcher(module: Any, load_device: Any) -> Any:
    """A ComfyUI ``ModelPatcher`` around ``module`` so ComfyUI can offload it; None outside ComfyUI."""
    if not IN_COMFYUI:
        return None
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device())


def ensure_loaded(patcher: Any, module: Any, device: Any, memory_required: int = 0) -> None:
    """Bring the weights to ``device`` before use.

    In ComfyUI this goes through ``load_models_gpu(force_full_load=True)``: it frees room (unloading other
    models if needed, ``memory_required`` bytes of activations included) and reloads ours if "Unload models"
    or another node offloaded it since the last run. Outside ComfyUI: a plain ``module.to(device)``.
    """
    if patcher is not None:
        _mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
        return
    first = next(module.parameters())
    if first.device != device:
        module.to(device)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """Progress bar of the running node (ComfyUI's ProgressBar; every update also checks Cancel)."""

    def __init__(self, total: int):
        self.total = total
        self._bar = _cu.ProgressBar(total) if IN_COMFYUI else None

    def update(self, value: int, preview: Any = None) -> None:
        """``value`` out of ``total``; ``preview`` is a PIL image shown on the node, or None."""
        check_interrupt()
        if self._bar is not None:
            payload = ("JPEG", preview, preview_size()) if preview is not None else None
            self._bar.update_absolute(value, self.total, payload)

    def update_count(self, done: int, total: int) -> None:
        """:meth:`update` as a ``progress(done, total)`` callback of janus_core (``total`` is this bar's)."""
        self.update(done)


def previews_enabled() -> bool:
    """Whether ComfyUI was started with a preview method (``--preview-method``); False outside ComfyUI."""
    if not IN_COMFYUI:
        return False
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


def preview_size() -> int:
    if IN_COMFYUI:
        from comfy.cli_args import args

        return int(getattr(args, "preview_size", 512))
    return 512


def sdxl_latent_previewer(device: Any) -> Callable[[Any], Any] | None:
    """A function ``[1, 4, h, w]`` model-space SDXL latent -> PIL preview, built once per sampling run.

    Uses ComfyUI's own latent previewer (Latent2RGB, or TAESD-XL when chosen and installed); None when
    previews are off or outside ComfyUI.
    """
    if not previews_enabled():
        return None
    import comfy.latent_formats
    import latent_preview

    previewer = latent_preview.get_previewer(device, comfy.latent_formats.SDXL())
    if previewer is None:
        return None

    def preview(latent: Any) -> Any:
        # float32 as ComfyUI's samplers hand it over: TAESD's float32 weights refuse a bf16 latent
        return previewer.decode_latent_to_preview_image("JPEG", latent.float())[1]

    return preview


def soft_empty_cache() -> None:
    if IN_COMFYUI:
        _mm.soft_empty_cache()
