"""Resolve a model name or path to a checkpoint folder, downloading a known release on request.

A download goes into ``<target>.partial`` and gets its final name only once every file the hub lists for
:data:`DOWNLOAD_PATTERNS` is present at the listed size, and every shard named by a ``*.index.json`` is
present. On any failure the partial folder and its resume data stay, and the error says what is there.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath, PureWindowsPath

from .config import JanusConfig
from .errors import CheckpointError, model_files

logger = logging.getLogger(__name__)


class ModelKind(Enum):
    """How a model makes images: VQ tokens one by one (Janus, Janus-Pro) or rectified flow (JanusFlow)."""

    AR = "Janus / Janus-Pro (autoregressive)"
    FLOW = "JanusFlow"

    @classmethod
    def of(cls, config: JanusConfig) -> ModelKind:
        return cls.FLOW if config.is_flow else cls.AR


@dataclass(frozen=True)
class Release:
    """A known release on the Hugging Face hub: DeepSeek's, and Janus-4o-7B (FreedomIntelligence's fine-tune of
    Janus-Pro-7B for instruction editing, Janus-Pro-7B's architecture and file format)."""

    repo_id: str
    kind: ModelKind


KNOWN_RELEASES: dict[str, Release] = {
    "Janus-1.3B": Release("deepseek-ai/Janus-1.3B", ModelKind.AR),
    "Janus-Pro-1B": Release("deepseek-ai/Janus-Pro-1B", ModelKind.AR),
    "Janus-Pro-7B": Release("deepseek-ai/Janus-Pro-7B", ModelKind.AR),
    "Janus-4o-7B": Release("FreedomIntelligence/Janus-4o-7B", ModelKind.AR),
    "JanusFlow-1.3B": Release("deepseek-ai/JanusFlow-1.3B", ModelKind.FLOW),
}

# Only what loading needs: configs, tokenizer, weights (no demo images, no duplicate formats beyond these).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
PARTIAL_SUFFIX = ".partial"  # an unfinished download: never listed or loaded as a model
RESUME_DATA = ".cache"  # huggingface_hub's resume data inside a local_dir download


def known_name(name: str) -> str | None:
    """``"Janus-Pro-1B"`` for ``"Janus-Pro-1B"`` or ``"deepseek-ai/Janus-Pro-1B"`` (any case); else None."""
    tail = name.strip().rsplit("/", 1)[-1].lower()
    for short in KNOWN_RELEASES:
        if short.lower() == tail:
            return short
    return None


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def escape_reason(name: str) -> str | None:
    """Why the relative name ``name`` (``/`` or ``\\`` separated) could leave the folder it is relative to.

    None when it stays inside: no absolute path, drive letter, ``~``, ``.``/``..`` or empty part, no NUL.
    Symlinks inside the folder are not looked at: the user put them there.
    """
    if not name.strip():
        return "is empty"
    if "\0" in name:
        return "contains a NUL character"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    if PureWindowsPath(name).drive:
        return "starts with a drive letter"
    if name.startswith("~"):
        return "starts with '~' (a home folder)"
    parts = name.replace("\\", "/").split("/")
    if any(part in (".", "..") for part in parts):
        return "has a '.' or '..' part"
    if "" in parts:
        return "has an empty part (a doubled or trailing '/')"
    return None


# --- downloads ---------------------------------------------------------------------------------------------

@dataclass
class DownloadCheck:
    """What a download folder holds compared with the hub's listing (names relative to the folder)."""

    complete: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)  # "name (have of want bytes)"
    problems: list[str] = field(default_factory=list)  # unreadable or unsafe shard indexes

    @property
    def ok(self) -> bool:
        return not (self.missing or self.wrong_size or self.problems)

    def describe(self) -> str:
        total = len(self.complete) + len(self.missing) + len(self.wrong_size)
        text = f"{len(self.complete)} of {total} files complete"
        if self.complete:
            text += f" ({', '.join(self.complete)})"
        if self.missing:
            text += f"; missing: {', '.join(self.missing)}"
        if self.wrong_size:
            text += f"; incomplete: {', '.join(self.wrong_size)}"
        if self.problems:
            text += f"; {'; '.join(self.problems)}"
        return text


def _index_shards(folder: Path, index_name: str, check: DownloadCheck) -> list[str]:
    """The shard names (relative to ``folder``) of the index ``folder/index_name``; problems go to ``check``."""
    path = folder / index_name
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested too deep
        index = None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        check.problems.append(f"{index_name} is not a shard index (a JSON object with a 'weight_map')")
        return []
    base = PurePosixPath(index_name).parent
    shards = []
    for shard in sorted(set(weight_map.values())):
        reason = escape_reason(shard)
        if reason is not None:
            check.problems.append(f"{index_name} names a shard '{shard}' that {reason}")
        else:
            shards.append(str(base / shard.replace("\\", "/")))
    return shards


def check_download(folder: Path, expected: dict[str, int | None]) -> DownloadCheck:
    """Compare ``folder`` with ``expected`` (file name -> size in bytes, None = unknown) and its shard indexes."""
    check = DownloadCheck()
    wanted = dict(expected)
    indexes = {name for name in expected if name.endswith(".index.json")}
    indexes |= {p.name for p in folder.glob("*.index.json")} if folder.is_dir() else set()
    for index_name in sorted(indexes):
        if (folder / index_name).is_file():
            for shard in _index_shards(folder, index_name, check):
                wanted.setdefault(shard, None)
    for name, size in sorted(wanted.items()):
        path = folder / name
        have = path.stat().st_size if path.is_file() else None
        if have is None:
            check.missing.append(name)
        elif size is not None and have != size:
            check.wrong_size.append(f"{name} ({have:,} of {size:,} bytes)")
        else:
            check.complete.append(name)
    return check


def _repo_files(repo_id: str) -> tuple[dict[str, int | None], str | None]:
    """The files of ``repo_id`` matching :data:`DOWNLOAD_PATTERNS` with their sizes, and the listed commit."""
    from huggingface_hub import model_info
    from huggingface_hub.utils import filter_repo_objects

    info = model_info(repo_id, files_metadata=True)
    siblings = list(filter_repo_objects(info.siblings or [], allow_patterns=DOWNLOAD_PATTERNS,
                                        key=lambda s: s.rfilename))
    return {s.rfilename: s.size for s in siblings}, info.sha


def _present_files(folder: Path) -> list[str]:
    """Files in ``folder`` (``/``-separated relative names), without the resume data."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).parts[0] != RESUME_DATA)


def download_model(repo_id: str, target: Path) -> Path:
    """Download ``repo_id`` into ``target`` (via ``target.partial``, renamed once complete) and return ``target``."""
    from huggingface_hub import snapshot_download

    target = Path(target)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)

    def failed(what: str, exc: BaseException | None, check: DownloadCheck | None) -> CheckpointError:
        cause = f"{type(exc).__name__}: {exc}" if exc is not None else "the hub client returned without error"
        if not partial.is_dir():
            kept = "Nothing was downloaded"
        elif check is None:
            held = ", ".join(_present_files(partial)) or "no files yet"
            kept = f"The partial download {partial} is kept (it holds: {held})"
        else:
            kept = f"The partial download {partial} is kept with its resume data ({check.describe()})"
        return CheckpointError(f"{what} ({cause}). {kept}. Check the connection and run again to resume, or "
                               f"download the repository yourself into {target}.")

    if target.exists():  # not a model folder (the caller looked): downloading into it would end in a clash
        raise CheckpointError(f"{target} exists but holds no complete checkpoint (no config.json), so {repo_id} "
                              f"cannot be downloaded there. Delete or rename {target}, then run again.")
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise CheckpointError(f"{partial} is a file, not an unfinished download folder; delete or rename it, then "
                              "run again.")
    try:
        expected, revision = _repo_files(repo_id)
    except Exception as exc:  # offline, connection error, 5xx, unknown repo: nothing new was written
        raise failed(f"Listing the files of {repo_id} on the Hugging Face hub failed", exc, None) from exc
    unsafe = [f"'{name}' {reason}" for name in expected if (reason := escape_reason(name)) is not None]
    if unsafe:
        raise CheckpointError(f"{repo_id} lists files outside its folder ({', '.join(unsafe)}); not downloading it.")
    if "config.json" not in expected:
        raise CheckpointError(f"{repo_id} has no config.json; is '{repo_id}' a Janus repository?")
    with model_files(str(partial.parent)):  # a models folder that is a file, or not writable
        partial.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s into %s (resumable; progress below)", repo_id, partial)
    error = None
    try:
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(partial), allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as exc:  # any failure: report what is on disk, keep it for resuming
        error = exc
    check = check_download(partial, expected)
    if error is not None or not check.ok:
        raise failed(f"Downloading {repo_id} did not finish", error, check) from error
    if target.exists():
        raise CheckpointError(f"{target} appeared during the download; remove one of {target} / {partial}.")
    shutil.rmtree(partial / RESUME_DATA, ignore_errors=True)
    partial.rename(target)
    logger.info("downloaded %s: %d files in %s", repo_id, len(check.complete), target)
    return target


# --- resolution ----------------------------------------------------------------------------------------------

def looks_like_path(text: str) -> bool:
    """Whether a CLI/library model value is meant as a path, so it must never start a download.

    True when it starts with ``.``, ``~``, ``/`` or a drive letter, has a path separator and is not exactly a
    known repo id (``deepseek-ai/Janus-Pro-1B``), or exists on disk.
    """
    text = text.strip()
    if text.startswith((".", "~", "/", "\\")) or PureWindowsPath(text).drive:
        return True
    repo_ids = {release.repo_id.lower() for release in KNOWN_RELEASES.values()}
    if ("/" in text or "\\" in text) and text.lower() not in repo_ids:
        return True
    return Path(text).exists()


def _missing_path_message(path: Path) -> str:
    """Why ``path`` is no model folder, naming the nearest existing parent when it does not exist."""
    if path.is_file():
        return f"'{path}' is a file; --model needs the checkpoint folder that holds config.json."
    if path.is_dir():
        return f"'{path}' has no config.json; point to the folder holding the checkpoint files."
    parent = next((p for p in path.absolute().parents if p.is_dir()), None)
    nearest = f"; the nearest existing folder is '{parent}'" if parent is not None else ""
    return f"Model folder '{path}' does not exist{nearest}. Check the path (no download is started for a path)."


def resolve_model_path(name_or_path: str | Path, search_dirs: list[Path], download_dir: Path | None = None) -> Path:
    """A checkpoint folder for ``name_or_path`` (CLI and library; absolute folders allowed).

    Order: an existing folder path; a relative name inside one of ``search_dirs``; a known release
    (``Janus-Pro-1B`` or ``deepseek-ai/Janus-Pro-1B``) found as ``<dir>/<name>`` or downloaded into
    ``download_dir/<name>`` (only when ``download_dir`` is given). A value that :func:`looks_like_path` is never
    downloaded.
    """
    text = str(name_or_path).strip()
    if not text:
        raise CheckpointError("No model given: name a checkpoint folder or a release such as "
                              f"{next(iter(KNOWN_RELEASES.values())).repo_id}.")
    direct = Path(text).expanduser()
    if direct.name.endswith(PARTIAL_SUFFIX):
        release = known_name(direct.name.removesuffix(PARTIAL_SUFFIX))
        resume = f"run again with --model {release} to resume it" if release else "finish or repeat the download"
        raise CheckpointError(f"'{text}' is an unfinished download (a '{PARTIAL_SUFFIX}' folder is never loaded): "
                              f"{resume}, then use the folder without '{PARTIAL_SUFFIX}'.")
    if is_model_folder(direct):
        return direct
    inside = [Path(base) / text.replace("\\", "/") for base in search_dirs] if escape_reason(text) is None else []
    for folder in inside:
        if is_model_folder(folder):
            return folder
    where = ", ".join(str(d) for d in search_dirs) or "(no model folders configured)"
    if looks_like_path(text):
        message = _missing_path_message(direct)
        if inside:
            message += f" It is not a model folder in {where} either."
        raise CheckpointError(message)
    short = known_name(text)
    if short is not None:
        for base in search_dirs:
            if is_model_folder(Path(base) / short):
                return Path(base) / short
        if download_dir is not None:
            return download_model(KNOWN_RELEASES[short].repo_id, Path(download_dir) / short)
    raise CheckpointError(
        f"Model '{text}' not found: not a folder, not in {where}. Known downloadable releases: "
        f"{', '.join(release.repo_id for release in KNOWN_RELEASES.values())}."
    )
