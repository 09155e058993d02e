"""nodes.comfy_services and the loader without ComfyUI: folder fallbacks, combo listing, validation, and the
ComfyUI code paths (memory manager, progress, previews, cancel) against small stand-ins for ComfyUI's modules."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY, node_model
from PIL import Image

from janus_core import memory
from janus_core.errors import CheckpointError
from janus_core.generate_ar import decode_bytes, generation_bytes
from janus_core.generate_flow import flow_bytes, initial_noise, iter_flow_steps
from janus_core.image_tokens import encode_bytes
from janus_core.prompts import IMAGE_TOKENS
from janus_core.understanding import understanding_bytes
from nodes import comfy_services as cs
from nodes import text_to_image
from nodes.flow import DSJanusFlowSampler
from nodes.loader import (
    DOWNLOAD_SUFFIX,
    DSJanusModelLoader,
    JanusModelHandle,
    local_model_folder,
    model_choices,
)
from nodes.text_to_image import (
    PREVIEW_EVERY,
    DSJanusARSampler,
    DSJanusCFGPair,
    DSJanusPromptEncoder,
    DSJanusVQDecode,
    DSJanusVQEncode,
    ImageTokens,
    partial_grid_preview,
)
from nodes.understand import DSJanusUnderstand

KNOWN = ["Janus-1.3B", "Janus-Pro-1B", "Janus-Pro-7B", "Janus-4o-7B", "JanusFlow-1.3B"]


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    """A models folder in JANUS_MODELS_DIR with a model, a nested model, an unfinished download and noise."""
    base = tmp_path / "Janus"
    model_folder(base / "my-janus")
    model_folder(base / "deepseek-ai" / "JanusFlow-1.3B")
    model_folder(base / "deepseek-ai" / "JanusFlow-1.3B" / "vae")  # a model's sub-folder: not a model
    model_folder(base / "Janus-Pro-7B.partial")  # download under way
    model_folder(base / ".cache" / "hidden")
    (base / "empty").mkdir()
    (base / "notes.txt").write_text("x")
    model_folder(base / "a" / "b" / "c" / "too-deep")
    os.symlink(PRO_TINY, base / "linked-tiny", target_is_directory=True)
    monkeypatch.setenv("JANUS_MODELS_DIR", str(base))
    return base


# --- folders without ComfyUI ---------------------------------------------------------------------------

def test_model_dirs_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv("JANUS_MODELS_DIR", raising=False)
    assert cs.model_dirs() == []
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("JANUS_MODELS_DIR", os.pathsep.join([str(a), str(b), "", str(a)]))
    assert cs.model_dirs() == [a, b]
    assert cs.download_dir() == a


def test_download_dir_default_without_any_folder(monkeypatch):
    monkeypatch.delenv("JANUS_MODELS_DIR", raising=False)
    assert cs.download_dir() == Path("models") / "Janus"


def test_find_model_folders(models_dir):
    assert cs.find_model_folders(models_dir) == ["deepseek-ai/JanusFlow-1.3B", "linked-tiny", "my-janus"]
    assert cs.find_model_folders(models_dir / "missing") == []
    assert "a/b/c/too-deep" in cs.find_model_folders(models_dir, max_depth=4)


def test_model_choices_lists_folders_and_downloads(models_dir):
    choices = model_choices()
    assert choices[:3] == ["deepseek-ai/JanusFlow-1.3B", "linked-tiny", "my-janus"]
    # JanusFlow-1.3B is on disk (nested); the others are offered for download, the .partial one too.
    assert choices[3:] == [n + DOWNLOAD_SUFFIX for n in KNOWN if n != "JanusFlow-1.3B"]
    assert not any(".partial" in c or ".cache" in c or c.endswith("/vae") for c in choices)
    assert DSJanusModelLoader.INPUT_TYPES()["required"]["model"][0] == choices


def test_model_choices_without_folders(monkeypatch):
    monkeypatch.delenv("JANUS_MODELS_DIR", raising=False)
    assert model_choices() == [n + DOWNLOAD_SUFFIX for n in KNOWN]


@pytest.mark.parametrize("value", [
    "Janus-Pro-1B (download)", "Janus-Pro-7B (download)", "JanusFlow-1.3B (download)", "Janus-Pro-1B",
    "deepseek-ai/Janus-1.3B", "my-janus", "linked-tiny", "deepseek-ai/JanusFlow-1.3B",
])
def test_validate_inputs_accepts(models_dir, value):
    assert DSJanusModelLoader.VALIDATE_INPUTS(value) is True


@pytest.mark.parametrize(("value", "reason"), [
    ("../outside/Janus-Pro-1B", "'..' part"), ("linked-tiny/../my-janus", "'..' part"),
    ("./my-janus", "'.' or '..' part"), ("..\\outside\\Janus-Pro-1B", "'..' part"),
    ("C:\\models\\Janus-Pro-1B", "drive letter"), ("C:Janus-Pro-1B", "drive letter"),
    ("\\\\server\\share\\Janus-Pro-1B", "absolute path"), ("~/Janus-Pro-1B", "'~'"),
    ("deepseek-ai//Janus-Pro-1B", "empty part"), ("my-janus/", "empty part"),
])
def test_names_outside_the_model_folders_are_refused(models_dir, value, reason):
    outside = models_dir.parent / "outside"  # a real model that "../outside/Janus-Pro-1B" would reach
    outside.mkdir()
    (outside / "Janus-Pro-1B").symlink_to(PRO_TINY, target_is_directory=True)
    message = DSJanusModelLoader.VALIDATE_INPUTS(value)
    assert isinstance(message, str) and reason in message and str(models_dir) in message
    with pytest.raises(CheckpointError, match="only takes names inside the model folders"):
        DSJanusModelLoader().load(value)


def test_absolute_paths_are_refused_even_inside_the_model_folders(models_dir, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "Janus-Pro-1B").symlink_to(PRO_TINY, target_is_directory=True)
    for value in (str(PRO_TINY), str(models_dir / "my-janus"), str(tmp_path / "outside" / "Janus-Pro-1B")):
        message = DSJanusModelLoader.VALIDATE_INPUTS(value)
        assert isinstance(message, str) and "is an absolute path" in message and "symlink" in message
        with pytest.raises(CheckpointError, match="is an absolute path"):
            local_model_folder(value)


@pytest.mark.parametrize("value", ["Janus-Pro-7B.partial", "not-a-model", "empty", "Janus-Pro-2B (download)", " "])
def test_validate_inputs_rejects(models_dir, value):
    message = DSJanusModelLoader.VALIDATE_INPUTS(value)
    assert isinstance(message, str) and message


@pytest.mark.parametrize("value", [5, None, ["Janus-Pro-1B"]])
def test_validate_inputs_rejects_names_that_are_not_text(models_dir, value):
    """The HTTP API accepts any JSON value for the model widget."""
    assert DSJanusModelLoader.VALIDATE_INPUTS(value) == (
        f"The model must be a folder name (text), got {type(value).__name__}.")


def test_validate_message_names_the_folders(models_dir):
    assert str(models_dir) in DSJanusModelLoader.VALIDATE_INPUTS("not-a-model")


def test_local_model_folder(models_dir):
    assert local_model_folder("my-janus") == models_dir / "my-janus"
    assert local_model_folder("linked-tiny") == models_dir / "linked-tiny"
    # a known release found under another layout, with or without the download mark
    assert local_model_folder("JanusFlow-1.3B") == models_dir / "deepseek-ai" / "JanusFlow-1.3B"
    assert local_model_folder("JanusFlow-1.3B (download)") == models_dir / "deepseek-ai" / "JanusFlow-1.3B"
    assert local_model_folder("Janus-Pro-1B (download)") is None  # must be downloaded
    assert local_model_folder("Janus-Pro-7B") is None  # only a .partial download exists


# --- the loader and nodes without ComfyUI ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pro_handle() -> JanusModelHandle:
    return node_model(PRO_TINY)


@pytest.fixture(scope="module")
def flow_handle() -> JanusModelHandle:
    return node_model(FLOW_TINY)


def test_loader_by_name_and_plain_ready(models_dir):
    handle = DSJanusModelLoader().load("linked-tiny", dtype="fp32")[0]
    assert handle.patcher is None  # no ComfyUI: plain device moves
    model = handle.ready()
    assert model.folder.name == "linked-tiny" and model.device == torch.device("cpu")
    assert model.dtype == torch.float32


def test_without_comfyui_services_are_inert():
    assert not cs.IN_COMFYUI
    cs.register_model_folders()
    cs.check_interrupt()
    cs.soft_empty_cache()
    cs.Progress(3).update(1, preview=Image.new("RGB", (8, 8)))
    assert not cs.previews_enabled()
    assert cs.sdxl_latent_previewer(torch.device("cpu")) is None
    assert cs.make_patcher(torch.nn.Linear(1, 1), torch.device("cpu")) is None
    assert cs.offload_device() == torch.device("cpu")


def test_partial_grid_preview(pro_handle):
    model = pro_handle.ready()
    tokens = torch.randint(0, 4096, (2, 30))
    assert partial_grid_preview(model, tokens[:, :20]) is None  # no complete row yet
    image = partial_grid_preview(model, tokens)
    assert image.size == (384, 384)
    pixels = torch.from_numpy(np.array(image))
    assert (pixels[16 * 2:] == 127).all()  # rows not generated yet are grey


# --- ComfyUI code paths, against stand-ins for ComfyUI's modules -----------------------------------------

class Interrupted(Exception):
    pass


class FakeComfy:
    """Stand-ins for comfy.model_management, comfy.utils and folder_paths, recording what the nodes do."""

    def __init__(self, models_root: Path, interrupt_after: int | None = None):
        self.loads: list[tuple] = []
        self.updates: list[tuple] = []
        self.checks = 0
        self.interrupt_after = interrupt_after
        self.mm = SimpleNamespace(
            load_models_gpu=lambda models, memory_required=0, force_full_load=False:
                self.loads.append((models, force_full_load, memory_required)),
            throw_exception_if_processing_interrupted=self._check,
            get_torch_device=lambda: torch.device("cpu"),
            unet_offload_device=lambda: torch.device("cpu"),
            soft_empty_cache=lambda: None,
        )
        fake = self

        class ProgressBar:
            def __init__(self, total):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.updates.append((value, total, preview))

        self.cu = SimpleNamespace(ProgressBar=ProgressBar)
        self.fp = SimpleNamespace(models_dir=str(models_root), folder_names_and_paths={},
                                  add_model_folder_path=self._add, get_folder_paths=self._get)

    def _check(self):
        self.checks += 1
        if self.interrupt_after is not None and self.checks > self.interrupt_after:
            raise Interrupted()

    def _add(self, name, path, is_default=False):
        paths = self.fp.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def _get(self, name):
        return list(self.fp.folder_names_and_paths[name][0])

    def install(self, monkeypatch, previews: bool = True) -> FakeComfy:
        monkeypatch.setattr(cs, "_mm", self.mm)
        monkeypatch.setattr(cs, "_cu", self.cu)
        monkeypatch.setattr(cs, "_fp", self.fp)
        monkeypatch.setattr(cs, "IN_COMFYUI", True)
        monkeypatch.setattr(cs, "previews_enabled", lambda: previews)
        monkeypatch.setattr(cs, "preview_size", lambda: 256)
        return self


def test_register_model_folders_is_additive(tmp_path, monkeypatch):
    monkeypatch.delenv("JANUS_MODELS_DIR", raising=False)
    fake = FakeComfy(tmp_path / "models").install(monkeypatch)
    fake.fp.folder_names_and_paths["Janus"] = (["/extra/Janus"], set())  # from extra_model_paths.yaml
    fake.fp.folder_names_and_paths["janus_pro"] = (["/extra/other"], set())
    cs.register_model_folders()
    cs.register_model_folders()  # idempotent
    default = str(tmp_path / "models" / "Janus")
    assert fake.fp.folder_names_and_paths["Janus"][0] == [default, "/extra/Janus"]  # yaml entry kept
    assert cs.model_dirs() == [Path(default), Path("/extra/Janus"), Path("/extra/other"),
                               tmp_path / "models" / "Janus-Pro"]
    assert cs.download_dir() == Path(default)


def test_register_model_folders_default(tmp_path, monkeypatch):
    monkeypatch.delenv("JANUS_MODELS_DIR", raising=False)
    fake = FakeComfy(tmp_path / "models").install(monkeypatch)
    cs.register_model_folders()
    assert fake.fp.folder_names_and_paths["Janus"][0] == [str(tmp_path / "models" / "Janus")]
    model_folder(tmp_path / "models" / "Janus-Pro" / "Janus-Pro-1B")  # where other packs keep it
    assert model_choices()[0] == "Janus-Pro-1B"
    assert "Janus-Pro-1B (download)" not in model_choices()
    assert cs.download_dir() == tmp_path / "models" / "Janus"


def test_ensure_loaded_goes_through_load_models_gpu(tmp_path, monkeypatch):
    fake = FakeComfy(tmp_path).install(monkeypatch)
    module = torch.nn.Linear(2, 2)
    cs.ensure_loaded("patcher", module, torch.device("cpu"), memory_required=123)
    assert fake.loads == [(["patcher"], True, 123)]


def _ar_pair(handle, batch_size=1):
    prompt = DSJanusPromptEncoder().encode(handle, "a red fox")[0]
    return DSJanusCFGPair().build(handle, prompt, batch_size)[0]


def test_ar_sampler_progress_previews_and_cancel(pro_handle, tmp_path, monkeypatch):
    pair = _ar_pair(pro_handle)
    monkeypatch.setattr(text_to_image, "PREVIEW_TIME_BUDGET", 1e9)  # previews on the row schedule only
    fake = FakeComfy(tmp_path, interrupt_after=100).install(monkeypatch)
    with pytest.raises(Interrupted):
        DSJanusARSampler().sample(pro_handle, pair, seed=1, cfg_weight=5.0, temperature=1.0, top_k=0, top_p=1.0)
    # one update per token; cancel took effect at the first check after it was requested
    assert [u[0] for u in fake.updates] == list(range(1, 101))
    assert all(u[1] == IMAGE_TOKENS for u in fake.updates)
    previews = [(u[0], u[2]) for u in fake.updates if u[2] is not None]
    assert [p[0] for p in previews] == [PREVIEW_EVERY, 2 * PREVIEW_EVERY]
    fmt, image, size = previews[0][1]
    assert fmt == "JPEG" and size == 256 and image.size == (384, 384)


def test_ar_sampler_full_run_with_progress(pro_handle, tmp_path, monkeypatch):
    pair = _ar_pair(pro_handle, batch_size=2)
    monkeypatch.setattr(pro_handle, "patcher", "patcher")  # as in ComfyUI: loads go through load_models_gpu
    fake = FakeComfy(tmp_path).install(monkeypatch, previews=False)
    tokens = DSJanusARSampler().sample(pro_handle, pair, seed=3, cfg_weight=5.0, temperature=1.0, top_k=0,
                                       top_p=1.0)[0]
    assert tokens.tokens.shape == (2, IMAGE_TOKENS) and tokens.tokens.device.type == "cpu"
    assert len(fake.updates) == IMAGE_TOKENS and fake.updates[-1][0] == IMAGE_TOKENS
    assert all(u[2] is None for u in fake.updates)
    # janus_core's estimate of the run (KV cache of 2 x batch rows, buffers, logits) is announced to ComfyUI
    expected = generation_bytes(pro_handle.model, pair)
    assert fake.loads == [(["patcher"], True, expected)] and expected > 0


def test_preview_schedule_respects_time_budget(monkeypatch):
    clock = iter([0.0, 10.0, 10.0, 11.0, 12.0, 50.0, 60.0])
    monkeypatch.setattr(text_to_image.time, "perf_counter", lambda: next(clock))
    schedule = text_to_image.PreviewSchedule()  # t=0
    assert not schedule.due(PREVIEW_EVERY - 1)
    assert schedule.due(PREVIEW_EVERY)  # t=10: no cost measured yet
    schedule.record(PREVIEW_EVERY, started=9.0)  # t=10: the preview took 1 s
    assert not schedule.due(2 * PREVIEW_EVERY)  # t=11: 1 s of sampling * 0.1 < 1 s of preview
    assert not schedule.due(2 * PREVIEW_EVERY)  # t=12
    assert schedule.due(2 * PREVIEW_EVERY)  # t=50: 40 s * 0.1 >= 1 s


def test_flow_sampler_progress_preview_and_cancel(flow_handle, tmp_path, monkeypatch):
    prompt = DSJanusPromptEncoder().encode(flow_handle, "a lighthouse")[0]
    pair = DSJanusCFGPair().build(flow_handle, prompt, 1)[0]
    seen = []
    monkeypatch.setattr(cs, "sdxl_latent_previewer", lambda device: lambda z: seen.append(z.clone()) or "img")
    fake = FakeComfy(tmp_path).install(monkeypatch)
    latent = DSJanusFlowSampler().sample(flow_handle, pair, seed=0, steps=3, cfg_weight=2.0)[0]
    assert latent["samples"].shape == (1, 4, 48, 48) and latent["samples"].dtype == torch.float32
    assert [(u[0], u[1]) for u in fake.updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(u[2][1] == "img" for u in fake.updates)
    # previews show where each step heads (the predicted clean latent), not the noisy z
    model = flow_handle.model
    expected = [st.predicted_clean() for st in iter_flow_steps(model, pair, initial_noise(model, 1, 0), 3, 2.0)]
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    assert not torch.equal(seen[0], latent["samples"])  # the first preview is not the noise either

    fake = FakeComfy(tmp_path, interrupt_after=2).install(monkeypatch)
    with pytest.raises(Interrupted):
        DSJanusFlowSampler().sample(flow_handle, pair, seed=0, steps=50, cfg_weight=2.0)
    assert [u[0] for u in fake.updates] == [1, 2]


def test_understand_progress_and_cancel(pro_handle, tmp_path, monkeypatch):
    image = torch.from_numpy(np.array(Image.open(IMAGE_PATH).convert("RGB"))).float()[None] / 255
    fake = FakeComfy(tmp_path).install(monkeypatch)
    out = DSJanusUnderstand().answer(pro_handle, image, "What is this?", "per image", max_new_tokens=6,
                                     temperature=0.0, top_p=0.95, seed=0)
    assert len(out["result"][0]) == 1 and out["ui"]["text"] == out["result"][0]
    values = [u[0] for u in fake.updates]
    assert values[-1] == 6 and values[:-1] == list(range(1, len(values)))

    fake = FakeComfy(tmp_path, interrupt_after=2).install(monkeypatch)
    with pytest.raises(Interrupted):
        DSJanusUnderstand().answer(pro_handle, image, "What is this?", "per image", max_new_tokens=50,
                                   temperature=0.0, top_p=0.95, seed=0)
    assert len(fake.updates) <= 2


class MemoryChecked(Exception):
    pass


@pytest.mark.parametrize("node", ["ar", "inpaint", "decode", "encode", "flow", "understand"])
def test_nodes_make_room_for_the_estimate_before_the_library_checks(node, pro_handle, flow_handle, tmp_path,
                                                                    monkeypatch):
    """Each node announces janus_core's estimate to ComfyUI's memory manager, which makes room; only then does the
    library compare its estimate with the free memory (and refuse a run that still does not fit)."""
    handle = flow_handle if node == "flow" else pro_handle
    monkeypatch.setattr(handle, "patcher", "patcher")
    fake = FakeComfy(tmp_path).install(monkeypatch, previews=False)
    events: list[tuple] = []
    fake.mm.load_models_gpu = lambda models, memory_required=0, force_full_load=False: events.append(
        ("load_models_gpu", memory_required))

    def free_bytes(device):
        events.append(("free_bytes",))
        raise MemoryChecked

    monkeypatch.setattr(memory, "free_bytes", free_bytes)
    model = handle.model
    with pytest.raises(MemoryChecked):
        if node == "ar":
            pair = _ar_pair(handle, batch_size=2)
            expected = generation_bytes(model, pair)
            DSJanusARSampler().sample(handle, pair, seed=0, cfg_weight=5.0, temperature=1.0, top_k=0, top_p=1.0)
        elif node == "inpaint":  # the first 12 token rows are kept: fed at once, the estimate says so
            pair = _ar_pair(handle, batch_size=2)
            expected = generation_bytes(model, pair, 12 * 24)
            mask = torch.zeros(1, 384, 384)
            mask[:, 192:] = 1.0
            init = ImageTokens(torch.zeros(1, IMAGE_TOKENS, dtype=torch.long), (24, 24), str(model.folder), (384, 384))
            DSJanusARSampler().sample(handle, pair, 0, 5.0, 1.0, 0, 1.0, 5.0, init, mask)
        elif node == "encode":
            expected = encode_bytes(model, 2)
            DSJanusVQEncode().encode(handle, torch.rand(2, 32, 48, 3))
        elif node == "decode":
            codes = torch.zeros(3, IMAGE_TOKENS, dtype=torch.long)
            expected = decode_bytes(model, 3)
            DSJanusVQDecode().decode(handle, ImageTokens(codes, (24, 24), str(model.folder), (384, 384)))
        elif node == "flow":
            prompt = DSJanusPromptEncoder().encode(handle, "a lighthouse")[0]
            pair = DSJanusCFGPair().build(handle, prompt, 2)[0]
            expected = flow_bytes(model, pair, 1.0)
            DSJanusFlowSampler().sample(handle, pair, seed=0, steps=3, cfg_weight=1.0)
        else:
            image = torch.rand(2, 32, 48, 3)
            expected = understanding_bytes(model, 2, "What is this?", 7, per_image=False)
            DSJanusUnderstand().answer(handle, image, "What is this?", "all images in one question",
                                       max_new_tokens=7, temperature=0.0, top_p=0.95, seed=0)
    assert events[0] == ("load_models_gpu", expected) and expected > 0
    assert events[1:] == [("free_bytes",)]


def test_sdxl_previews_get_float32_latents(monkeypatch):
    """ComfyUI's TAESD-XL previewer has float32 weights and does not cast its input; a JanusFlow model running in
    bf16 must still get previews (ComfyUI's own samplers hand float32 latents over)."""
    import sys
    import types

    class TaesdLike:
        def decode_latent_to_preview_image(self, fmt, latent):
            if latent.dtype != torch.float32:
                raise RuntimeError("Input type (c10::BFloat16) and bias type (float) should be the same")
            return fmt, "image", 512

    formats = types.ModuleType("comfy.latent_formats")
    formats.SDXL = lambda: "sdxl"
    comfy_pkg = types.ModuleType("comfy")
    comfy_pkg.latent_formats = formats
    latent_preview = types.ModuleType("latent_preview")
    latent_preview.get_previewer = lambda device, fmt: TaesdLike() if fmt == "sdxl" else None
    monkeypatch.setitem(sys.modules, "comfy", comfy_pkg)
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    monkeypatch.setitem(sys.modules, "latent_preview", latent_preview)
    monkeypatch.setattr(cs, "previews_enabled", lambda: True)
    preview = cs.sdxl_latent_previewer(torch.device("cpu"))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert preview(torch.randn(1, 4, 48, 48, dtype=dtype)) == "image"


def test_vq_encode_and_decode_show_progress_and_stop_on_cancel(pro_handle, tmp_path, monkeypatch):
    """A batch of 10 images is worked four at a time: the bar moves after each group and Cancel stops between
    groups (the results equal one whole-batch call)."""
    images = torch.rand(10, 64, 48, 3)
    fake = FakeComfy(tmp_path).install(monkeypatch)
    tokens = DSJanusVQEncode().encode(pro_handle, images)[0]
    assert [u[:2] for u in fake.updates] == [(4, 10), (8, 10), (10, 10)]
    model = pro_handle.model
    from janus_core.generate_ar import decode_image_tokens
    from janus_core.image_tokens import encode_image_tokens

    assert torch.equal(tokens.tokens, encode_image_tokens(model, images))
    fake = FakeComfy(tmp_path).install(monkeypatch)
    decoded = DSJanusVQDecode().decode(pro_handle, tokens)[0]
    assert [u[:2] for u in fake.updates] == [(4, 10), (8, 10), (10, 10)]
    assert torch.equal(decoded, decode_image_tokens(model, tokens.tokens))
    for node, run in ((DSJanusVQEncode(), lambda n: n.encode(pro_handle, images)),
                      (DSJanusVQDecode(), lambda n: n.decode(pro_handle, tokens))):
        fake = FakeComfy(tmp_path, interrupt_after=1).install(monkeypatch)
        with pytest.raises(Interrupted):
            run(node)
        assert [u[0] for u in fake.updates] == [4]
