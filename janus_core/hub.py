"""Resolve a model name or path to a checkpoint folder, downloading a known DeepSeek release on request.

Downloads use ``huggingface_hub.snapshot_download`` into ``<target>.partial`` and are renamed to
``<target>`` only once complete, so an interrupted download never leaves a folder that looks valid.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .errors import CheckpointError

logger = logging.getLogger(__name__)

KNOWN_REPOS = {
    "Janus-1.3B": "deepseek-ai/Janus-1.3B",
    "Janus-Pro-1B": "deepseek-ai/Janus-Pro-1B",
    "Janus-Pro-7B": "deepseek-ai/Janus-Pro-7B",
    "JanusFlow-1.3B": "deepseek-ai/JanusFlow-1.3B",
}

# Only what loading needs: configs, tokenizer, weights (no demo images, no duplicate formats beyond these).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]


def known_name(name: str) -> str | None:
    """``"Janus-Pro-1B"`` for ``"Janus-Pro-1B"`` or ``"deepseek-ai/Janus-Pro-1B"`` (any case); else None."""
    tail = name.strip().rsplit("/", 1)[-1].lower()
    for short in KNOWN_REPOS:
        if short.lower() == tail:
            return short
    return None


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def download_model(repo_id: str, target: Path) -> Path:
    """Download ``repo_id`` into ``target`` (atomically, via ``target.partial``) and return ``target``."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a requirement
        raise CheckpointError("huggingface_hub is needed to download models: pip install huggingface-hub") from exc
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s (resumable; progress below)", repo_id, target)
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(partial), allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as exc:
        raise CheckpointError(
            f"Downloading {repo_id} failed ({type(exc).__name__}: {exc}). The partial download is kept in "
            f"{partial} and resumes on the next try; or download the repository yourself into {target}."
        ) from exc
    if not is_model_folder(partial):
        raise CheckpointError(f"The download of {repo_id} has no config.json; is '{repo_id}' a Janus repository?")
    for leftover in (partial / ".cache",):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        raise CheckpointError(f"{target} appeared during the download; remove one of {target} / {partial}.")
    partial.rename(target)
    return target


def resolve_model_path(name_or_path: str | Path, search_dirs: list[Path], download_dir: Path | None = None) -> Path:
    """A checkpoint folder for ``name_or_path``.

    Order: an existing folder path; a sub-folder of one of ``search_dirs``; a known DeepSeek release
    (``Janus-Pro-1B`` or ``deepseek-ai/Janus-Pro-1B``) found as ``<dir>/<name>`` or downloaded into
    ``download_dir/<name>`` (only when ``download_dir`` is given).
    """
    text = str(name_or_path).strip()
    direct = Path(text).expanduser()
    if is_model_folder(direct):
        return direct
    for base in search_dirs:
        if is_model_folder(Path(base) / text):
            return Path(base) / text
    short = known_name(text)
    if short is not None:
        for base in search_dirs:
            if is_model_folder(Path(base) / short):
                return Path(base) / short
        if download_dir is not None:
            return download_model(KNOWN_REPOS[short], Path(download_dir) / short)
    if direct.is_dir():
        raise CheckpointError(f"'{direct}' has no config.json; point to the folder holding the checkpoint files.")
    where = ", ".join(str(d) for d in search_dirs) or "(no model folders configured)"
    raise CheckpointError(
        f"Model '{text}' not found: not a folder, not in {where}. Known downloadable releases: "
        f"{', '.join(KNOWN_REPOS.values())}."
    )
