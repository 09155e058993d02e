"""The command line main job and model resolution / downloads (huggingface_hub faked: no network in tests)."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import janus_core
from janus_core import hub
from janus_core.cli import main
from janus_core.errors import CheckpointError
from janus_core.generate_ar import decode_image_tokens, generate_image_tokens
from janus_core.images import to_uint8
from janus_core.understanding import understand
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY


def test_generate_writes_the_images_of_the_library(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--model", str(PRO_TINY), "--prompt", "A red cube.", "--batch-size", "2",
                 "--seed", "5", "--dtype", "fp32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in written] == ["janus_5.png", "janus_6.png"]
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    expected = to_uint8(decode_image_tokens(model, generate_image_tokens(model, "A red cube.", 2, seed=5)))
    for path, image in zip(written, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), image.numpy())


def test_flow_cli_decodes_with_a_diffusers_vae(tmp_path, capsys):
    pytest.importorskip("diffusers", reason="the flow CLI decodes with diffusers (pip install diffusers)")
    code = main(["flow", "--model", str(FLOW_TINY), "--prompt", "Sunset.", "--steps", "2", "--dtype", "fp32",
                 "--device", "cpu", "--vae", str(FLOW_TINY / "vae"), "--out", str(tmp_path)])
    assert code == 0
    path = capsys.readouterr().out.split()[0]
    assert Image.open(path).size == (384, 384)


def test_understand_cli_prints_the_answer(capsys):
    code = main(["understand", "--model", str(PRO_TINY), "--image", str(IMAGE_PATH), "--question",
                 "Describe this image.", "--max-new-tokens", "8", "--dtype", "fp32", "--device", "cpu"])
    assert code == 0
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    expected = understand(model, [Image.open(IMAGE_PATH)], "Describe this image.", max_new_tokens=8)[0]
    assert capsys.readouterr().out == expected.strip() + "\n"


def test_cli_reports_bad_input_without_traceback(tmp_path, caplog):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no config.json" in caplog.text


def fake_snapshot(source, fail=False):
    def snapshot_download(repo_id, local_dir, allow_patterns):
        shutil.copytree(source, local_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("golden"))
        if fail:
            raise OSError("connection reset")
        return local_dir

    return snapshot_download


def test_known_release_downloads_atomically(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(PRO_TINY))
    path = hub.resolve_model_path("deepseek-ai/Janus-Pro-1B", [tmp_path], download_dir=tmp_path)
    assert path == tmp_path / "Janus-Pro-1B" and (path / "config.json").is_file()
    assert not (tmp_path / "Janus-Pro-1B.partial").exists()
    # now found on disk, no second download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", None)
    assert hub.resolve_model_path("Janus-Pro-1B", [tmp_path], download_dir=tmp_path) == path


def test_failed_download_leaves_no_valid_folder(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(PRO_TINY, fail=True))
    with pytest.raises(CheckpointError, match="Downloading deepseek-ai/JanusFlow-1.3B failed"):
        hub.resolve_model_path("JanusFlow-1.3B", [tmp_path], download_dir=tmp_path)
    assert not (tmp_path / "JanusFlow-1.3B").exists()
    assert (tmp_path / "JanusFlow-1.3B.partial").exists()  # kept for resuming


def test_resolution_order_and_errors(tmp_path):
    shutil.copytree(PRO_TINY, tmp_path / "my-model", ignore=shutil.ignore_patterns("golden"))
    assert hub.resolve_model_path(str(tmp_path / "my-model"), []) == tmp_path / "my-model"
    assert hub.resolve_model_path("my-model", [tmp_path]) == tmp_path / "my-model"
    with pytest.raises(CheckpointError, match="Known downloadable releases"):
        hub.resolve_model_path("nonexistent", [tmp_path])
    with pytest.raises(CheckpointError, match="not found"):
        hub.resolve_model_path("Janus-Pro-7B", [tmp_path])  # known, but downloads not allowed here
