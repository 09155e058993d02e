"""What a new user meets on the command line (issue 15): each mistake is one ERROR line and exit code 2.

The CLI runs as a subprocess, offline (HF_HUB_OFFLINE=1, an empty Hugging Face cache), on the tiny fixtures.
Every stderr line must be one of ours (INFO progress or the single ERROR): no traceback, no third-party warning.
"""

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from janus_core import cli
from janus_core.errors import JanusError
from janus_core.model import _readable_count, resolve_device
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path: Path, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "janus_core", *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def only_our_log_lines(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    strays = [line for line in lines if not re.match(r"(INFO|ERROR) ", line)]
    assert not strays, f"unexpected output on stderr:\n{stderr}"
    return lines


def assert_one_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, done.stderr
    errors = [line for line in only_our_log_lines(done.stderr) if line.startswith("ERROR")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def test_flow_offline_without_a_local_vae_is_one_line(tmp_path):
    done = run_cli(tmp_path, "flow", "--model", FLOW_TINY, "--prompt", "Sunset.", "--steps", "1")
    assert_one_error(done, "'stabilityai/sdxl-vae' is not in the Hugging Face cache", "HF_HUB_OFFLINE", "--vae")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_flow_refuses_an_ar_model_before_touching_the_vae(tmp_path):
    done = run_cli(tmp_path, "flow", "--model", PRO_TINY, "--prompt", "Sunset.")
    assert_one_error(done, "needs a JanusFlow model", "Janus AR Token Sampler", "python -m janus_core generate")


def test_generate_with_a_janusflow_model_names_the_real_node_and_subcommand(tmp_path):
    done = run_cli(tmp_path, "generate", "--model", FLOW_TINY, "--prompt", "A cat.")
    assert_one_error(done, "JanusFlow ODE Sampler", "python -m janus_core flow")


def test_understand_reports_a_missing_image_before_loading(tmp_path):
    done = run_cli(tmp_path, "understand", "--model", PRO_TINY, "--image", IMAGE_PATH, "--image", "missing.png")
    assert_one_error(done, "--image missing.png does not exist")
    assert "INFO janus_core.model" not in done.stderr


@pytest.mark.parametrize(("image", "problem"), [("notes.txt", " is not an image Pillow can read"),
                                                (".", " is a folder"), (os.devnull, " is not a regular file"),
                                                ("float.tiff", ": A mode 'F' (float) image holds values from 7")],
                         ids=["not an image", "folder", "device", "float pixels out of range"])
def test_understand_reports_unreadable_images(tmp_path, monkeypatch, caplog, image, problem):
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.fromarray(np.full((4, 4), 7.0, dtype=np.float32)).save(tmp_path / "float.tiff")  # 0..1 expected
    assert cli.main(["understand", "--model", str(PRO_TINY), "--image", image]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"--image {image}{problem}")


def test_unusable_device_is_one_line(tmp_path):
    done = run_cli(tmp_path, "generate", "--model", PRO_TINY, "--prompt", "A cat.", "--device", "cuda:99")
    assert_one_error(done, "Device 'cuda:99' is not available", "cpu")


def test_bad_number_is_one_line_before_loading(tmp_path):
    done = run_cli(tmp_path, "generate", "--model", PRO_TINY, "--prompt", "A cat.", "--batch-size", "2.5")
    assert_one_error(done, "--batch-size", "'2.5' is not a whole number >= 1", "--help")


def test_flow_run_logs_nothing_but_its_own_lines(tmp_path):
    done = run_cli(tmp_path, "flow", "--model", FLOW_TINY, "--prompt", "Sunset.", "--steps", "2", "--dtype", "fp32",
                   "--vae", FLOW_TINY / "vae", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    lines = only_our_log_lines(done.stderr)  # no "install accelerate", no huggingface_hub deprecation warning
    assert any(re.search(r"janusflow: [1-9]\d*\.\d\d[KMB] parameters on cpu", line) for line in lines), done.stderr
    assert done.stdout.split() == [str(tmp_path / "out" / "janusflow_0.png")]


def test_every_subcommand_help_shows_its_defaults():
    done = subprocess.run([sys.executable, "-m", "janus_core", "flow", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "stabilityai/sdxl-vae)" in done.stdout and "``" not in done.stdout
    top = cli.build_parser()
    assert "``" not in top.format_help()
    subcommands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert sorted(subcommands) == ["flow", "generate", "quantize", "understand"]
    for name, sub in subcommands.items():
        assert "``" not in sub.format_help()
        for action in sub._actions:
            if action.default not in (None, False, argparse.SUPPRESS):
                shown = " ".join(sub._get_formatter()._format_action(action).split())
                assert f"(default: {action.default})" in shown, (name, shown)


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--prompt", "p", "--cfg-weight", "nan"],
    ["generate", "--model", "m", "--prompt", "p", "--top-p", "0"],
    ["generate", "--model", "m", "--prompt", "p", "--seed", str(2**64)],
    ["flow", "--model", "m", "--prompt", "p", "--steps", "0"],
    ["understand", "--model", "m", "--image", "a.png", "--max-new-tokens", "many"],
    ["understand", "--model", "m"],
])
def test_bad_arguments_are_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR python -m janus_core ") and err.count("\n") == 1, err


def test_resolve_device_says_why_a_device_cannot_be_used(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(JanusError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr("torch.version.cuda", None)
    monkeypatch.setattr("torch.version.hip", None)
    with pytest.raises(JanusError, match="CPU-only build"):
        resolve_device("cuda")
    monkeypatch.setattr("torch.version.cuda", "12.4")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(JanusError, match="torch sees 0 CUDA GPU"):
        resolve_device("cuda")


def test_parameter_counts_are_readable():
    assert [_readable_count(n) for n in (999, 351_760, 1_490_000, 2_090_000_000)] == ["999", "351.76K", "1.49M",
                                                                                       "2.09B"]


def test_vae_download_failure_is_one_error_without_retries(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from janus_core.sdxl_vae import load_sdxl_vae

    calls = []

    def unreachable(url, **kwargs):
        calls.append(url)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(JanusError, match=r"Cannot get the VAE 'janus-tests/no-such-vae' .*ConnectionError"):
        load_sdxl_vae("janus-tests/no-such-vae")
    assert len(calls) == 1
    with pytest.raises(JanusError, match="neither an existing folder nor a Hugging Face repo id"):
        load_sdxl_vae("/no/such/folder/vae")


def test_flow_decoding_without_diffusers_says_how_to_get_it(monkeypatch):
    from janus_core.sdxl_vae import load_sdxl_vae

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(JanusError, match="needs diffusers: pip install diffusers"):
        load_sdxl_vae(FLOW_TINY / "vae")


def test_variant_flag_loads_a_folder_whose_files_cannot_tell_the_variant(tmp_path, caplog):
    folder = tmp_path / "renamed-copy"
    shutil.copytree(PRO_TINY, folder, ignore=shutil.ignore_patterns("golden", "special_tokens_map.json"))
    argv = ["understand", "--model", str(folder), "--image", str(IMAGE_PATH), "--max-new-tokens", "2",
            "--dtype", "fp32"]
    assert cli.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--variant janus-pro" in errors[0]
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert cli.main([*argv, "--variant", "janus-pro"]) == 0
    assert any(r.getMessage().startswith("janus-pro: ") for r in caplog.records)


def vae_copy(tmp_path: Path, edit=None) -> Path:
    folder = tmp_path / "vae"
    shutil.copytree(FLOW_TINY / "vae", folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("case", "message"), [
    ("model folder", "has no diffusion_pytorch_model.safetensors; pass the SDXL VAE folder"),
    ("truncated", "is not a usable diffusers AutoencoderKL folder"),
    ("16 channels", "makes latents of 16 channels at 1/8 of the image size; JanusFlow needs the SDXL VAE"),
    ("other downscale", "makes latents of 4 channels at 1/16 of the image size"),
])
def test_a_vae_that_cannot_decode_janusflow_latents_is_refused_before_generating(tmp_path, case, message):
    if case == "model folder":
        vae = FLOW_TINY  # the JanusFlow folder instead of its vae/ subfolder
    elif case == "truncated":
        vae = vae_copy(tmp_path)
        weights = next(vae.glob("diffusion_pytorch_model.*"))
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "16 channels":
        vae = vae_copy(tmp_path, lambda c: c.update(latent_channels=16))
        for weights in vae.glob("diffusion_pytorch_model.*"):
            weights.unlink()  # random weights of the new shape
        (vae / "config.json").write_text((vae / "config.json").read_text())
    else:
        vae = vae_copy(tmp_path, lambda c: c.update(block_out_channels=[16, 32, 32, 32, 32],
                                                    down_block_types=["DownEncoderBlock2D"] * 5,
                                                    up_block_types=["UpDecoderBlock2D"] * 5))
        for weights in vae.glob("diffusion_pytorch_model.*"):
            weights.unlink()
    if case in ("16 channels", "other downscale"):
        from diffusers import AutoencoderKL

        config = json.loads((vae / "config.json").read_text())
        AutoencoderKL.from_config(config).save_pretrained(vae)
    done = run_cli(tmp_path, "flow", "--model", FLOW_TINY, "--prompt", "Sunset.", "--steps", "1", "--vae", vae,
                   "--out", tmp_path / "out")
    assert_one_error(done, message)
    assert not any("flow" in line and "step" in line for line in done.stderr.splitlines())  # before generating
