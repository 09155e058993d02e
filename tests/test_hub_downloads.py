"""Downloads of known releases against a fake Hugging Face hub (no network): a folder gets its final name only
when complete; every failure keeps ``<name>.partial`` with its resume data and says what is there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

import janus_core
from janus_core import hub
from janus_core.errors import CheckpointError
from nodes.loader import DOWNLOAD_SUFFIX, DSJanusModelLoader, model_choices
from tests.conftest import PRO_TINY

REPO = "deepseek-ai/Janus-Pro-1B"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


class ServerError(OSError):
    """What the hub client raises on a 5xx answer (its own HTTP error class varies between versions)."""


class FakeHub:
    """``huggingface_hub.model_info`` / ``snapshot_download`` serving the files of a local folder.

    Like the real client with ``local_dir``: resume data goes to ``<local_dir>/.cache`` and a file appears under
    its name only once complete. ``fail_at``: the index of the file during which ``error`` is raised (that file
    is left half-written in the resume data); ``drop``: files silently not written (the call still returns).
    """

    def __init__(self, repo: Path, monkeypatch: pytest.MonkeyPatch):
        self.repo = repo
        self.listing_error: Exception | None = None
        self.fail_at: int | None = None
        self.error: Exception = ConnectionError("connection reset by peer")
        self.drop: set[str] = set()
        self.downloads = 0
        monkeypatch.setattr(huggingface_hub, "model_info", self.model_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.repo).as_posix() for p in self.repo.rglob("*") if p.is_file())

    def model_info(self, repo_id: str, files_metadata: bool = False, **_):
        assert repo_id == REPO and files_metadata
        if self.listing_error is not None:
            raise self.listing_error
        siblings = [SimpleNamespace(rfilename=name, size=(self.repo / name).stat().st_size) for name in self.files()]
        return SimpleNamespace(sha="a" * 40, siblings=siblings)

    def snapshot_download(self, repo_id: str, local_dir: str, allow_patterns: list[str], revision=None, **_):
        assert revision == "a" * 40, "downloads the commit that was listed"
        self.downloads += 1
        local = Path(local_dir)
        resume = local / ".cache" / "huggingface" / "download"
        resume.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(filter_repo_objects(self.files(), allow_patterns=allow_patterns)):
            data = (self.repo / name).read_bytes()
            if i == self.fail_at:
                (resume / f"{name}.incomplete").write_bytes(data[: len(data) // 2])
                raise self.error
            if name not in self.drop and not (local / name).is_file():
                (local / name).parent.mkdir(parents=True, exist_ok=True)
                (local / name).write_bytes(data)
        return str(local)


def sharded_copy(folder: Path) -> Path:
    """The tiny Janus-Pro checkpoint with its weights split into two safetensors shards and an index."""
    shutil.copytree(PRO_TINY, folder, ignore=shutil.ignore_patterns("golden", "model.safetensors"))
    tensors = load_file(str(PRO_TINY / "model.safetensors"))
    names = sorted(tensors)
    halves = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "teaser.png").write_bytes(b"not downloaded: outside the patterns")
    return folder


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    return FakeHub(sharded_copy(tmp_path / "repo"), monkeypatch)


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv("JANUS_MODELS_DIR", str(folder))
    return folder


def download(models: Path) -> Path:
    return hub.resolve_model_path("Janus-Pro-1B", [models], download_dir=models)


def test_complete_download_is_renamed_listed_and_loads(fake_hub, models):
    path = download(models)
    assert path == models / "Janus-Pro-1B"
    assert sorted(p.name for p in path.iterdir()) == sorted(n for n in fake_hub.files() if n != "teaser.png")
    assert not (models / "Janus-Pro-1B.partial").exists() and not (path / ".cache").exists()
    assert "Janus-Pro-1B" in model_choices() and "Janus-Pro-1B" + DOWNLOAD_SUFFIX not in model_choices()
    model = janus_core.load_model(path, device="cpu", dtype=torch.float32)
    reference, loaded = load_file(str(PRO_TINY / "model.safetensors")), model.net.state_dict()
    for name in ("aligner.layers.0.weight", "vision_model.vision_tower.pos_embed"):  # one from each shard
        assert torch.equal(loaded[name], reference[name])
    assert download(models) == path and fake_hub.downloads == 1  # found on disk: no second download


def test_offline_before_start_creates_nothing(fake_hub, models):
    fake_hub.listing_error = ConnectionError("Failed to resolve 'huggingface.co'")
    with pytest.raises(CheckpointError) as err:
        download(models)
    message = str(err.value)
    assert "Listing the files of deepseek-ai/Janus-Pro-1B" in message and "Failed to resolve" in message
    assert "Nothing was downloaded" in message and ".partial" not in message
    assert not (models / "Janus-Pro-1B.partial").exists() and not (models / "Janus-Pro-1B").exists()
    assert fake_hub.downloads == 0


def test_offline_midway_keeps_partial_and_resumes(fake_hub, models):
    fake_hub.fail_at = 2  # after config.json and model-00001-of-00002.safetensors
    with pytest.raises(CheckpointError) as err:
        download(models)
    partial = models / "Janus-Pro-1B.partial"
    message = str(err.value)
    assert "connection reset by peer" in message and str(partial) in message and "run again to resume" in message
    assert "complete (config.json, model-00001-of-00002.safetensors)" in message
    assert "missing: model-00002-of-00002.safetensors" in message
    assert not (models / "Janus-Pro-1B").exists()
    assert (partial / ".cache" / "huggingface" / "download" / f"{SHARDS[1]}.incomplete").is_file()
    assert "Janus-Pro-1B" + DOWNLOAD_SUFFIX in model_choices()

    fake_hub.fail_at = None  # the connection is back: the next run completes the same folder
    assert download(models) == models / "Janus-Pro-1B" and not partial.exists()


def test_missing_shard_without_error_is_not_installed(fake_hub, models):
    fake_hub.drop = {SHARDS[1]}
    with pytest.raises(CheckpointError) as err:
        download(models)
    message = str(err.value)
    assert "returned without error" in message and f"missing: {SHARDS[1]}" in message
    assert (models / "Janus-Pro-1B.partial" / ".cache").is_dir() and not (models / "Janus-Pro-1B").exists()


def test_shard_named_by_index_but_not_listed(fake_hub, models):
    (fake_hub.repo / SHARDS[1]).unlink()  # the hub's listing lacks it too; only the index names it
    with pytest.raises(CheckpointError, match=f"missing: {SHARDS[1]}"):
        download(models)
    assert not (models / "Janus-Pro-1B").exists()


def test_short_file_is_reported_with_sizes(fake_hub, models):
    partial = models / "Janus-Pro-1B.partial"
    partial.mkdir(parents=True)
    (partial / SHARDS[0]).write_bytes(b"x" * 10)  # e.g. truncated by a full disk; the client keeps it
    with pytest.raises(CheckpointError, match=rf"incomplete: {SHARDS[0]} \(10 of [\d,]+ bytes\)"):
        download(models)


def test_5xx_on_listing_after_an_interrupted_download(fake_hub, models):
    fake_hub.fail_at = 1
    with pytest.raises(CheckpointError):
        download(models)
    fake_hub.listing_error = ServerError("503 Server Error: Service Unavailable")
    with pytest.raises(CheckpointError) as err:
        download(models)
    message = str(err.value)
    assert "503 Server Error" in message and "Janus-Pro-1B.partial is kept (it holds: config.json)" in message
    assert (models / "Janus-Pro-1B.partial" / ".cache").is_dir() and not (models / "Janus-Pro-1B").exists()


def test_5xx_during_download_returns_the_old_folder(fake_hub, models):
    """huggingface_hub answers a 5xx by returning the existing local_dir without error: that is not a model."""
    fake_hub.fail_at = 1
    with pytest.raises(CheckpointError):
        download(models)
    fake_hub.fail_at, fake_hub.drop = None, set(fake_hub.files())  # returns what is there, writes nothing
    listed = len(fake_hub.files()) - 1  # all but teaser.png
    with pytest.raises(CheckpointError, match=f"returned without error.*1 of {listed} files complete"):
        download(models)
    assert not (models / "Janus-Pro-1B").exists()


def test_node_download_failure_reaches_the_user(fake_hub, models):
    fake_hub.listing_error = ServerError("502 Bad Gateway")
    with pytest.raises(CheckpointError, match="502 Bad Gateway"):
        DSJanusModelLoader().load("Janus-Pro-1B" + DOWNLOAD_SUFFIX, dtype="fp32")
    assert "Janus-Pro-1B" + DOWNLOAD_SUFFIX in model_choices()


@pytest.mark.parametrize("index", ['["a"]', '{"weight_map": {"x": "../outside.safetensors"}}', "not json"])
def test_broken_or_escaping_index_is_not_installed(fake_hub, models, index):
    (fake_hub.repo / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json (is not a shard index|names a shard)"):
        download(models)
    assert not (models / "Janus-Pro-1B").exists()


def test_listing_with_a_file_outside_the_folder_is_refused(fake_hub, models, monkeypatch):
    listed = fake_hub.model_info(REPO, files_metadata=True)
    listed.siblings.append(SimpleNamespace(rfilename="../evil.json", size=1))
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: listed)
    with pytest.raises(CheckpointError, match=r"lists files outside its folder \('../evil.json'"):
        download(models)
    assert fake_hub.downloads == 0 and not (models / "Janus-Pro-1B.partial").exists()


def test_a_folder_in_the_way_is_reported_before_downloading(fake_hub, models):
    (models / "Janus-Pro-1B").mkdir(parents=True)  # e.g. made by hand, or by an older version, without weights
    with pytest.raises(CheckpointError, match=r"Janus-Pro-1B exists but holds no complete checkpoint .no "
                                              r"config.json.*Delete or rename"):
        download(models)
    assert fake_hub.downloads == 0 and not (models / "Janus-Pro-1B.partial").exists()


def test_a_file_named_like_the_partial_download_is_reported(fake_hub, models):
    models.mkdir()
    (models / "Janus-Pro-1B.partial").write_text("not a download")
    with pytest.raises(CheckpointError, match="Janus-Pro-1B.partial is a file, not an unfinished download folder"):
        download(models)
    assert fake_hub.downloads == 0


def test_a_models_folder_that_is_a_file_is_reported(fake_hub, tmp_path):
    blocked = tmp_path / "models-file"
    blocked.write_text("")
    with pytest.raises(CheckpointError, match="models-file.*Not a directory"):
        hub.resolve_model_path("Janus-Pro-1B", [], download_dir=blocked / "Janus")
    assert fake_hub.downloads == 0


@pytest.mark.parametrize("name", ["Janus-Pro-1B.partial", "PARTIAL_PATH"])
def test_an_unfinished_download_is_never_loaded_by_name(fake_hub, models, name):
    fake_hub.fail_at = 3
    with pytest.raises(CheckpointError):
        download(models)
    partial = models / "Janus-Pro-1B.partial"
    shutil.copy(PRO_TINY / "config.json", partial / "config.json")  # looks like a model folder now
    value = str(partial) if name == "PARTIAL_PATH" else name
    with pytest.raises(CheckpointError, match="is an unfinished download.*run again with --model Janus-Pro-1B"):
        hub.resolve_model_path(value, [models], download_dir=models)
