"""The command line main job and model resolution (downloads: test_hub_downloads.py; no network in tests)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import janus_core
from janus_core import hub
from janus_core.cli import _load, build_parser, main
from janus_core.config import load_config
from janus_core.errors import CheckpointError
from janus_core.generate_ar import decode_image_tokens, generate_image_tokens
from janus_core.images import to_uint8
from janus_core.understanding import understand
from tests.conftest import FIXTURES, FLOW_TINY, IMAGE_PATH, PRO_TINY

ROOT = FIXTURES.parent.parent


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
    # a second run never overwrites the first; names carry the seed that regenerates the image alone (mod 2**64)
    code = main(["generate", "--model", str(PRO_TINY), "--prompt", "Another.", "--batch-size", "2", "--seed",
                 str(2**64 - 1), "--dtype", "fp32", "--device", "cpu", "--out", str(out)])
    again = main(["generate", "--model", str(PRO_TINY), "--prompt", "A red cube.", "--seed", "6", "--dtype",
                  "fp32", "--device", "cpu", "--out", str(out)])
    names = [p.rsplit("/", 1)[-1] for p in capsys.readouterr().out.split()]
    assert code == again == 0 and names == [f"janus_{2**64 - 1}.png", "janus_0.png", "janus_6_2.png"]
    assert np.array_equal(np.asarray(Image.open(written[1])), expected[1].numpy())  # still the first run's


@pytest.mark.parametrize(("out", "message"), [("", "--out is empty"), ("/proc/self", "cannot write into the folder")])
def test_an_unusable_out_folder_fails_before_loading(out, message, caplog, monkeypatch):
    import janus_core.model

    monkeypatch.setattr(janus_core.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    if out and not Path(out).is_dir():
        pytest.skip("needs Linux's /proc")
    assert main(["generate", "--model", str(PRO_TINY), "--prompt", "x", "--out", out]) == 2
    assert message in caplog.text


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


def test_understand_cli_heads_each_answer_with_its_image(tmp_path, capsys):
    flipped = tmp_path / "flipped.png"
    Image.open(IMAGE_PATH).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    code = main(["understand", "--model", str(PRO_TINY), "--image", str(IMAGE_PATH), "--image", str(flipped),
                 "--question", "Describe this image.", "--max-new-tokens", "8", "--dtype", "fp32", "--device", "cpu"])
    assert code == 0
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    answers = understand(model, [Image.open(IMAGE_PATH), Image.open(flipped)], "Describe this image.",
                         max_new_tokens=8)
    assert capsys.readouterr().out == "".join(f"== {path} ==\n{answer.strip()}\n"
                                              for path, answer in zip((IMAGE_PATH, flipped), answers, strict=True))


def test_cli_reports_bad_input_without_traceback(tmp_path, caplog):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no config.json" in caplog.text


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything asks the Hugging Face hub."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "model_info", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.mark.parametrize("value", [
    "/tmp/typo/Janus-Pro-1B", "./Janus-Pro-1B", "../Janus-Pro-1B", "~/typo/Janus-Pro-1B", "typo/Janus-Pro-1B",
    "typo\\Janus-Pro-1B", "deepseek-ai/Janus-Pro-1B/", "C:\\models\\Janus-Pro-1B", ".Janus-Pro-1B",
])
def test_values_that_look_like_paths_are_never_downloaded(value, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    assert hub.looks_like_path(value)
    with pytest.raises(CheckpointError, match="does not exist"):
        hub.resolve_model_path(value, [tmp_path / "models"], download_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_a_name_existing_on_disk_is_a_path(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Janus-Pro-1B").mkdir()  # e.g. an empty folder left by a failed copy
    assert hub.looks_like_path("Janus-Pro-1B")
    with pytest.raises(CheckpointError, match="has no config.json"):
        hub.resolve_model_path("Janus-Pro-1B", [tmp_path / "models"], download_dir=tmp_path / "models")


@pytest.mark.parametrize("value", ["Janus-Pro-1B", "deepseek-ai/Janus-Pro-1B", "DeepSeek-AI/janus-pro-1b"])
def test_release_names_are_not_paths(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not hub.looks_like_path(value)


def test_missing_folder_names_the_nearest_existing_parent(tmp_path, no_hub):
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError) as err:
        hub.resolve_model_path(tmp_path / "models" / "typo" / "Janus-Pro-1B", [], download_dir=tmp_path)
    assert f"the nearest existing folder is '{tmp_path / 'models'}'" in str(err.value)
    with pytest.raises(CheckpointError, match="is a file"):
        hub.resolve_model_path(PRO_TINY / "config.json", [], download_dir=tmp_path)


def test_mistyped_path_on_the_command_line(tmp_path):
    """One ERROR line, exit 2, nothing created in the default --models-dir (no download started)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("JANUS_MODELS_DIR", None)
    typo = tmp_path / "typo" / "Janus-Pro-1B"
    run = subprocess.run([sys.executable, "-m", "janus_core", "generate", "--model", str(typo), "--prompt", "x"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR janus_core: Model folder '{typo}' does not exist; the nearest existing folder is "
                      f"'{tmp_path}'. Check the path (no download is started for a path)."]
    assert "Traceback" not in run.stderr and not (tmp_path / "models").exists()


@pytest.mark.parametrize(("command", "model", "use", "node"), [
    ("generate", "JanusFlow-1.3B", "flow", "JanusFlow ODE Sampler"),
    ("generate", "deepseek-ai/JanusFlow-1.3B", "flow", "JanusFlow ODE Sampler"),
    ("flow", "Janus-Pro-7B", "generate", "Janus AR Token Sampler"),
    ("flow", "deepseek-ai/Janus-1.3B", "generate", "Janus AR Token Sampler"),
])
def test_release_of_the_wrong_kind_is_refused_before_download(command, model, use, node, tmp_path, caplog, no_hub):
    assert main([command, "--model", model, "--models-dir", str(tmp_path / "models"), "--prompt", "x"]) == 2
    assert f"`python -m janus_core {use}`" in caplog.text and f"the {node} node" in caplog.text
    assert not (tmp_path / "models").exists()


def config_only(source, folder):
    """A copy of ``source`` without any weight file."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("golden", "vae", "*.safetensors"))
    return folder


@pytest.fixture
def loads(monkeypatch) -> list:
    """Records load_model calls instead of reading weights."""
    import janus_core.model

    calls = []
    monkeypatch.setattr(janus_core.model, "load_model", lambda path, **kwargs: calls.append(path) or "model")
    return calls


@pytest.mark.parametrize(("command", "source", "use"), [
    ("generate", FLOW_TINY, "flow"), ("flow", PRO_TINY, "generate"),
])
def test_folder_of_the_wrong_kind_is_refused_before_reading_weights(command, source, use, tmp_path, caplog, loads):
    folder = config_only(source, tmp_path / "model")
    assert main([command, "--model", str(folder), "--prompt", "x"]) == 2
    assert f"`python -m janus_core {use}`" in caplog.text and loads == []


@pytest.mark.parametrize("source", [FLOW_TINY, PRO_TINY])
def test_understand_takes_either_kind(source, tmp_path, loads):
    folder = config_only(source, tmp_path / "model")
    args = build_parser().parse_args(["understand", "--model", str(folder), "--image", str(IMAGE_PATH)])
    assert _load(args) == "model" and loads == [folder]


def test_kinds_of_the_known_releases():
    kinds = {short: release.kind for short, release in hub.KNOWN_RELEASES.items()}
    assert kinds == {"Janus-1.3B": hub.ModelKind.AR, "Janus-Pro-1B": hub.ModelKind.AR,
                     "Janus-Pro-7B": hub.ModelKind.AR, "Janus-4o-7B": hub.ModelKind.AR,
                     "JanusFlow-1.3B": hub.ModelKind.FLOW}
    assert hub.ModelKind.of(load_config(FLOW_TINY)) is hub.ModelKind.FLOW
    assert hub.ModelKind.of(load_config(PRO_TINY)) is hub.ModelKind.AR


@pytest.mark.parametrize("name", ["my-model", "deepseek-ai/Janus-Pro-1B", "org\\name", "a.b/c..d", "..x"])
def test_escape_reason_accepts_names_inside(name):
    assert hub.escape_reason(name) is None


@pytest.mark.parametrize("name", ["", " ", "/abs", "\\abs", "C:x", "c:/x", "~", "~user/x", "..", "a/../b", "a/./b",
                                  "a\\..\\b", "a//b", "a/", "a\x00b"])
def test_escape_reason_refuses_names_that_leave_the_folder(name):
    assert hub.escape_reason(name)


def test_resolution_order_and_errors(tmp_path):
    shutil.copytree(PRO_TINY, tmp_path / "my-model", ignore=shutil.ignore_patterns("golden"))
    assert hub.resolve_model_path(str(tmp_path / "my-model"), []) == tmp_path / "my-model"
    assert hub.resolve_model_path("my-model", [tmp_path]) == tmp_path / "my-model"
    with pytest.raises(CheckpointError, match="Known downloadable releases"):
        hub.resolve_model_path("nonexistent", [tmp_path])
    with pytest.raises(CheckpointError, match="not found"):
        hub.resolve_model_path("Janus-Pro-7B", [tmp_path])  # known, but downloads not allowed here
