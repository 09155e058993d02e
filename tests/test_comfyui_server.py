"""Runs every workflow in workflows/ through a real ComfyUI server (needs COMFYUI_PATH; slow, opt-in).

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q -m comfyui tests/test_comfyui_server.py

Run it with a Python that has ComfyUI's requirements and this pack's installed (the server is started with the
same interpreter, or with COMFYUI_PYTHON). The server runs on loopback with ``--cpu`` and its own temporary
``--base-directory``: this pack is symlinked into its custom_nodes, the tiny fixtures are the models (one in an
``--extra-model-paths-config`` folder, one in the legacy ``models/Janus-Pro`` folder), and the SDXL VAE for
JanusFlow is a randomly initialised full-size SDXL-architecture VAE saved with diffusers keys (ComfyUI's VAE
loader builds the SDXL architecture from fixed sizes, so the fixture's tiny VAE cannot stand in for it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from comfy_client import ComfyServer, RunResult
from conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY
from workflow_format import CORE_NODES, check_ui_workflow, combo_values, input_specs, spec_type, ui_to_api

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
TINY_MODELS = {"pro": "janus-pro-tiny", "flow": "janusflow-tiny"}
KNOWN = ["Janus-1.3B", "Janus-Pro-1B", "Janus-Pro-7B", "Janus-4o-7B", "JanusFlow-1.3B"]
BATCH = 2
IMAGE_TOKENS = 576

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run the real-server test"),
]


def write_sdxl_vae(path: Path) -> None:
    """A random full-size SDXL-architecture VAE, single file, diffusers key names (ComfyUI converts them)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers builds the stand-in SDXL VAE")
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
    save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(path))


# Input images the workflows' Load Image nodes name: the fixture image, and a copy whose transparent rectangle is
# Load Image's MASK (1 = transparent = regenerate) for the inpainting workflow.
INPUT_IMAGES = ("example.png", "example_masked.png")


def write_masked_example(path: Path) -> None:
    """The fixture image with a transparent rectangle in its lower middle (the part to regenerate)."""
    from PIL import Image

    with Image.open(IMAGE_PATH) as im:
        rgba = im.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (60, 110, 240, 190))
    rgba.putalpha(alpha)
    rgba.save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = Path(COMFYUI_PATH)
    if not (comfy / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no main.py)")
    root = tmp_path_factory.mktemp("comfy")
    base = root / "base"
    for sub in ("custom_nodes", "input", "output", "user", "models/Janus-Pro"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-Janus").symlink_to(REPO, target_is_directory=True)
    shutil.copy(IMAGE_PATH, base / "input" / INPUT_IMAGES[0])
    write_masked_example(base / "input" / INPUT_IMAGES[1])
    # models: Janus-Pro tiny through extra_model_paths (models/Janus is added beside it), JanusFlow tiny in the
    # legacy models/Janus-Pro folder other packs use.
    extra = root / "extra_models"
    (extra / "Janus").mkdir(parents=True)
    (extra / "vae").mkdir()
    (extra / "Janus" / TINY_MODELS["pro"]).symlink_to(PRO_TINY, target_is_directory=True)
    (base / "models" / "Janus-Pro" / TINY_MODELS["flow"]).symlink_to(FLOW_TINY, target_is_directory=True)
    write_sdxl_vae(extra / "vae" / "sdxl_vae.safetensors")
    config = root / "extra_model_paths.yaml"
    config.write_text(f"janus_test:\n    base_path: {extra}\n    Janus: Janus\n    vae: vae\n")
    srv = ComfyServer(
        comfy_path=comfy,
        python=os.environ.get("COMFYUI_PYTHON", sys.executable),
        args=["--base-directory", str(base), "--extra-model-paths-config", str(config), "--preview-method", "auto",
              "--disable-metadata"],
        log_path=root / "comfyui.log",
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
             "PYTHONUNBUFFERED": "1"},
    )
    srv.base = base  # type: ignore[attr-defined]
    srv.start()
    try:
        info = srv.get("/object_info")
        if "DSJanusModelLoader" not in info:
            pytest.fail(f"ComfyUI did not load the pack:\n{srv.log_tail(120)}")
        srv.object_info = info  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.stop()


def api_prompt(server, path: Path, **overrides) -> dict:
    """The workflow as an API prompt, with the tiny models and test-sized batches swapped in."""
    wf = json.loads(path.read_text())
    for node in wf["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "DSJanusModelLoader":
            values[0] = TINY_MODELS["flow" if "flow" in values[0].lower() else "pro"]
        if node["type"] == "DSJanusCFGPair":
            values[0] = overrides.get("batch_size", BATCH)
        if node["type"] in ("DSJanusARSampler", "DSJanusFlowSampler"):
            values[0] = zlib.crc32(path.name.encode())  # workflows sharing a chain must not share its cache
    assert check_ui_workflow(wf, server.object_info, {("LoadImage", "image"): lambda v: v in INPUT_IMAGES}) == []
    prompt = ui_to_api(wf, server.object_info)
    for entry in prompt.values():
        for key, value in overrides.get(entry["class_type"], {}).items():
            entry["inputs"][key] = value
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def saved_pixels(server, result: RunResult, prompt: dict) -> list:
    """The images the Save Image nodes wrote, as float arrays ``[H, W, 3]`` in 0..1."""
    import numpy as np
    from PIL import Image

    images = []
    for node_id in (k for k, v in prompt.items() if v["class_type"] == "SaveImage"):
        for item in result.outputs[node_id]["images"]:
            with Image.open(server.base / "output" / item["subfolder"] / item["filename"]) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    return images


def saved_images(server, result: RunResult, prompt: dict) -> list:
    """The ``(width, height)`` of every image the Save Image nodes wrote."""
    return [(a.shape[1], a.shape[0]) for a in saved_pixels(server, result, prompt)]


def assert_success(server, result: RunResult) -> None:
    assert result.status == "success", f"{result.error()}\n--- server log ---\n{server.log_tail()}"


def run_twice(server, prompt: dict) -> tuple[RunResult, RunResult]:
    first = server.run(prompt)
    assert_success(server, first)
    second = server.run(prompt)
    assert_success(server, second)
    assert second.cached_nodes() == set(prompt), "a second identical run is served entirely from the cache"
    assert not second.executed_nodes() and not second.of_type("progress")
    return first, second


# --- the server sees what we expect ----------------------------------------------------------------------

def test_pack_loaded_and_model_folders(server):
    choices = server.object_info["DSJanusModelLoader"]["input"]["required"]["model"][0]
    assert TINY_MODELS["pro"] in choices  # via extra_model_paths.yaml (Janus key kept, models/Janus added)
    assert TINY_MODELS["flow"] in choices  # via models/Janus-Pro
    assert [c for c in choices if c.endswith(" (download)")] == [n + " (download)" for n in KNOWN]
    assert "Cannot import" not in "\n".join(line for line in server.log_text().splitlines() if "Janus" in line)


def test_workflows_served_as_templates(server):
    """ComfyUI serves a pack's workflows/ folder in its template browser."""
    templates = server.get("/workflow_templates")
    assert sorted(templates.get("ComfyUI-Janus", [])) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        assert server.get(f"/api/workflow_templates/ComfyUI-Janus/{path.name}") == json.loads(path.read_text())


def test_core_node_table_matches_server(server):
    for ntype, expected in CORE_NODES.items():
        live = server.object_info[ntype]
        got = [(n, spec_type(s), opt) for n, s, opt in input_specs(live)]
        assert got == [(n, spec_type(s), opt) for n, s, opt in input_specs(expected)], ntype
        assert live["output"] == expected["output"], ntype
        for (name, spec, _), (_, live_spec, _) in zip(input_specs(expected), input_specs(live), strict=True):
            if combo_values(spec) is not None:
                assert combo_values(live_spec) == combo_values(spec), f"{ntype}.{name}"
            for key in ("min", "max", "image_upload"):
                if key in spec[1]:
                    assert live_spec[1].get(key) == spec[1][key], f"{ntype}.{name}.{key}"


# --- every workflow runs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_and_second_run_is_cached(server, path):
    prompt = api_prompt(server, path)
    first, second = run_twice(server, prompt)
    types = {v["class_type"] for v in prompt.values()}

    if "DSJanusARSampler" in types:
        sampler = node_of(prompt, "DSJanusARSampler")
        progress = first.progress(sampler)
        assert [v for v, _ in progress] == list(range(1, IMAGE_TOKENS + 1))  # one event per token
        assert {m for _, m in progress} == {IMAGE_TOKENS}
        assert first.previews >= 1  # partial-grid previews (every 48 tokens at most, within a time budget)
        side = 768 if "ImageScaleBy" in types else 384
        assert saved_images(server, first, prompt) == [(side, side)] * BATCH
    if "DSJanusFlowSampler" in types:
        sampler = node_of(prompt, "DSJanusFlowSampler")
        steps = prompt[sampler]["inputs"]["steps"]
        assert first.progress(sampler) == [(i, steps) for i in range(1, steps + 1)]
        assert first.previews >= steps  # ComfyUI's latent previewer, every step
        assert saved_images(server, first, prompt) == [(384, 384)] * BATCH
    if "DSJanusUnderstand" in types:
        understand = node_of(prompt, "DSJanusUnderstand")
        progress = first.progress(understand)
        assert progress and progress[-1][0] == progress[-1][1] == prompt[understand]["inputs"]["max_new_tokens"]
        texts = first.outputs[node_of(prompt, "PreviewAny")]["text"]
        assert len(texts) == 1 and isinstance(texts[0], str)
        assert first.outputs[understand]["text"] == texts
        assert second.outputs[node_of(prompt, "PreviewAny")]["text"] == texts


def test_changed_seed_reruns_only_downstream(server):
    path = REPO / "workflows" / "janus_pro_text_to_image.json"
    prompt = api_prompt(server, path)
    assert_success(server, server.run(prompt))
    sampler = node_of(prompt, "DSJanusARSampler")
    changed = copy.deepcopy(prompt)
    changed[sampler]["inputs"]["seed"] += 1
    result = server.run(changed)
    assert_success(server, result)
    upstream = {node_of(prompt, t) for t in ("DSJanusModelLoader", "DSJanusPromptEncoder", "DSJanusCFGPair")}
    assert upstream <= result.cached_nodes()  # the loader does not re-run
    assert result.executed_nodes() == set(prompt) - upstream


def test_flow_img2img_starts_from_the_input_image(server):
    """JanusFlow img2img in ComfyUI: with the smallest denoise the result stays close to the input image's VAE round
    trip (VAE Encode -> VAE Decode of the same picture); with denoise 1 it does not. (The stand-in VAE's latents are
    small, std ~0.04 in JanusFlow's space, so even 1 % of noise shows: hence the loose factor.)"""
    path = REPO / "workflows" / "janusflow_img2img.json"

    def saved(prompt: dict):
        result = server.run(prompt)
        assert_success(server, result)
        (image,) = saved_pixels(server, result, prompt)
        return image

    prompt = api_prompt(server, path, batch_size=1, DSJanusFlowSampler={"steps": 3, "denoise": 0.01})
    round_trip = copy.deepcopy(prompt)
    round_trip[node_of(prompt, "VAEDecode")]["inputs"]["samples"] = [node_of(prompt, "VAEEncode"), 0]
    reference = saved(round_trip)
    near = abs(saved(prompt) - reference).mean()
    prompt[node_of(prompt, "DSJanusFlowSampler")]["inputs"]["denoise"] = 1.0
    far = abs(saved(prompt) - reference).mean()
    assert near < 0.5 * far, (near, far)


def _loads(server) -> int:
    return server.log_text().count("Requested to load JanusARNet")


def test_unload_models_then_model_comes_back(server):
    path = REPO / "workflows" / "janus_pro_text_to_image.json"
    prompt = api_prompt(server, path, batch_size=1)
    sampler = node_of(prompt, "DSJanusARSampler")
    assert_success(server, server.run(prompt))
    loads = _loads(server)
    assert loads >= 1, "the model goes through ComfyUI's load_models_gpu"
    prompt[sampler]["inputs"]["seed"] += 100
    assert_success(server, server.run(prompt))
    assert _loads(server) == loads, "still loaded: no reload between runs"

    server.post("/free", {"unload_models": True})
    time.sleep(1.5)  # the prompt worker applies the flag between prompts
    prompt[sampler]["inputs"]["seed"] += 100
    result = server.run(prompt)
    assert_success(server, result)
    assert node_of(prompt, "DSJanusModelLoader") in result.cached_nodes()  # same handle, offloaded, reloaded
    assert _loads(server) == loads + 1, "after 'Unload models' the cached model is loaded again"

    server.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(1.5)
    result = server.run(prompt)  # caches were dropped too: everything runs again
    assert_success(server, result)
    assert result.executed_nodes() == set(prompt)


def _loaded_megabytes(server) -> float:
    """What ComfyUI's memory manager counted for the last model it loaded (its "loaded completely" log line)."""
    line = [t for t in server.log_text().splitlines() if "loaded completely" in t][-1]
    return float(line.split("loaded completely", 1)[1].split()[1])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_model_runs_is_sized_and_survives_unload(server, precision):
    """A quantized load runs the text-to-image workflow, ComfyUI sizes it at its quantized bytes, and after
    'Unload models' (weights moved away and back by ComfyUI) the same seed gives the same image."""
    path = REPO / "workflows" / "janus_pro_text_to_image.json"
    full = api_prompt(server, path, batch_size=1)
    assert_success(server, server.run(full))
    full_mb = _loaded_megabytes(server)
    prompt = api_prompt(server, path, batch_size=1, DSJanusModelLoader={"dtype": precision})
    first = server.run(prompt)
    assert_success(server, first)
    assert _loaded_megabytes(server) < 0.9 * full_mb
    before = saved_pixels(server, first, prompt)
    server.post("/free", {"unload_models": True, "free_memory": True})
    time.sleep(1.5)
    again = server.run(prompt)
    assert_success(server, again)
    assert again.executed_nodes() == set(prompt)
    after = saved_pixels(server, again, prompt)
    assert len(before) == len(after) == 1 and (before[0] == after[0]).all()


def test_cpu_packed_model_is_sized_and_survives_unload(server):
    """dtype auto: on a CPU where oneDNN packs bf16 weights the language model runs packed (the log says which
    way this CPU went); ComfyUI sizes the model at its full bytes, and after 'Unload models' (the same handle
    offloaded and loaded again) the same seed gives the same image."""
    path = REPO / "workflows" / "janus_pro_text_to_image.json"
    prompt = api_prompt(server, path, batch_size=1)
    sampler = node_of(prompt, "DSJanusARSampler")
    first = server.run(prompt)
    assert_success(server, first)
    log = server.log_text()
    assert "packed for oneDNN's bf16 matmul" in log or "plain bf16 weights" in log
    size = _loaded_megabytes(server)
    before = saved_pixels(server, first, prompt)
    server.post("/free", {"unload_models": True})
    time.sleep(1.5)
    seed = prompt[sampler]["inputs"]["seed"]
    prompt[sampler]["inputs"]["seed"] = seed + 1  # runs on the reloaded model
    assert_success(server, server.run(prompt))
    assert _loaded_megabytes(server) == size
    prompt[sampler]["inputs"]["seed"] = seed
    again = server.run(prompt)
    assert_success(server, again)
    after = saved_pixels(server, again, prompt)
    assert len(before) == len(after) == 1 and (before[0] == after[0]).all()


def test_interrupt_stops_sampling_and_leaves_no_broken_cache(server):
    path = REPO / "workflows" / "janusflow_text_to_image.json"
    prompt = api_prompt(server, path, batch_size=1, DSJanusFlowSampler={"steps": 200, "seed": 7})
    sampler = node_of(prompt, "DSJanusFlowSampler")
    result = server.run(prompt, interrupt_on_progress_of=sampler)
    assert result.of_type("execution_interrupted"), result.error()
    done = [v for v, _ in result.progress(sampler)]
    assert done and max(done) < 200, "cancel takes effect within a step or two"
    again = server.run(prompt)  # the interrupted sampler is not cached: it runs fully now
    assert_success(server, again)
    assert sampler in again.executed_nodes()
    assert [v for v, _ in again.progress(sampler)][-1] == 200


# --- the real frontend reads the workflows as we do (optional: needs playwright and a Chromium) -------------

FRONTEND_PROMPT = """async (wf) => {
    await window.app.loadGraphData(wf, true, false);
    const prompt = await window.app.graphToPrompt();
    return {output: prompt.output, saved: window.app.graph.serialize()};
}"""


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if path is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    return path


@contextlib.contextmanager
def frontend_page(server, errors: list[str], console: list[str] | None = None, **page_args):
    """The server's frontend in headless Chromium, once ``window.app.graph`` exists; page errors go to ``errors``."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the frontend")
    browser_path = _chromium()
    server.post("/settings", {"Comfy.TutorialCompleted": True})  # no first-run template dialog over the canvas
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(**page_args)
            page.on("pageerror", lambda e: errors.append(str(e)))
            if console is not None:
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(server.url, wait_until="networkidle", timeout=180_000)
            page.wait_for_function("() => window.app && window.app.graph", timeout=180_000)
            errors.clear()  # the frontend's own start-up (settings, no user database) is not under test
            yield page
        finally:
            browser.close()


def assert_same_prompt(server, got: dict, ours: dict, name: str) -> None:
    assert set(got) == set(ours), name
    for node_id, entry in ours.items():
        theirs = got[node_id]
        known = {n for n, _, _ in input_specs(server.object_info[entry["class_type"]])}
        # frontend-only display widgets (PreviewAny's "preview") are not node inputs
        theirs_inputs = {k: v for k, v in theirs["inputs"].items() if k in known}
        assert (theirs["class_type"], theirs_inputs) == (entry["class_type"], entry["inputs"]), name


def test_frontend_loads_workflows_like_our_converter(server):
    """ComfyUI's own frontend loads each workflow and turns it into the same API prompt as ui_to_api."""
    errors: list[str] = []
    with frontend_page(server, errors) as page:
        for path in WORKFLOWS:
            wf = json.loads(path.read_text())
            got = page.evaluate(FRONTEND_PROMPT, wf)
            assert_same_prompt(server, got["output"], ui_to_api(wf, server.object_info), path.name)
            saved = {n["id"]: n.get("widgets_values") for n in got["saved"]["nodes"]}
            assert saved == {n["id"]: n["widgets_values"] for n in wf["nodes"]}, f"{path.name} re-saved differs"
    assert not errors, errors


# --- layout: the samplers' live previews cover no other node ------------------------------------------------

NODE_BOXES = """() => window.app.graph._nodes.map((n) => ({
    id: n.id, type: n.type, box: Array.from(n.getBounding()), previews: (n.imgs || []).length}))"""


def overlap(a: list, b: list) -> bool:
    """Whether two ``[x, y, width, height]`` canvas boxes intersect."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_frontend_sampler_previews_cover_no_node(server):
    """Each workflow with a sampler, queued from the real frontend: once the sampler shows its live preview (the
    frontend draws it inside the node and grows a node that is too short for it), the sampler covers no node."""
    errors: list[str] = []
    with frontend_page(server, errors, viewport={"width": 1600, "height": 1000}) as page:
        for path in WORKFLOWS:
            wf = json.loads(path.read_text())
            samplers = [n["id"] for n in wf["nodes"] if n["type"] in ("DSJanusARSampler", "DSJanusFlowSampler")]
            if not samplers:
                continue
            seed = time.time_ns() % 2**48  # unique: never served from the cache
            for node in wf["nodes"]:
                values = node.get("widgets_values")
                if node["type"] == "DSJanusModelLoader":
                    values[0] = TINY_MODELS["flow" if "flow" in values[0].lower() else "pro"]
                if node["type"] == "DSJanusCFGPair":
                    values[0] = 1
                if node["id"] in samplers:
                    values[:2] = [seed, "fixed"]
                if node["type"] == "DSJanusFlowSampler":
                    values[2] = 4
            page.evaluate("(wf) => window.app.loadGraphData(wf, true, false)", wf)
            page.evaluate("() => window.app.queuePrompt(0, 1)")
            entry = _finished_entry(server, str(samplers[0]), "seed", seed)
            assert entry["status"]["status_str"] == "success", f"{path.name}: {entry['status']}\n{server.log_tail()}"
            for sampler in samplers:
                page.wait_for_function(f"() => (window.app.graph.getNodeById({sampler}).imgs || []).length > 0",
                                       timeout=60_000)
            page.wait_for_timeout(500)  # the canvas resizes a node for its preview when it draws it
            boxes = {b["id"]: b for b in page.evaluate(NODE_BOXES)}
            for sampler in samplers:
                covered = [b["type"] for b in boxes.values() if b["id"] != sampler
                           and overlap(boxes[sampler]["box"], b["box"])]
                assert not covered, f"{path.name}: the preview of node {sampler} covers {covered}"
    assert not errors, errors


# --- web/janus_show_text.js: the understanding node shows its answer ---------------------------------------

EXTENSION_JS = "/extensions/ComfyUI-Janus/janus_show_text.js"
ANSWER_STATE = """(nodeId) => {
    const node = window.app.graph.getNodeById(nodeId);
    const widget = node?.widgets?.find((w) => w.name === "answer");
    if (!widget) return null;
    const el = widget.inputEl;
    const box = el ? el.getBoundingClientRect() : null;
    const hit = box ? document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2) : null;
    return {value: widget.value, textarea: el ? el.value : null, readOnly: el ? el.readOnly : null,
            box: box ? [box.x, box.y, box.width, box.height] : null, onTop: hit === el,
            viewport: [window.innerWidth, window.innerHeight]};
}"""


def test_web_extension_is_served(server):
    assert EXTENSION_JS in server.get("/extensions")
    with urllib.request.urlopen(server.url + EXTENSION_JS, timeout=60) as r:
        assert "registerExtension" in r.read().decode()


def _finished_entry(server, node_id: str, name: str, value: object, timeout: float = 600.0) -> dict:
    """The history entry of the prompt the frontend queued (found by the unique ``value`` of input ``name`` of node
    ``node_id``), once it has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in server.get("/history").values():
            prompt = entry.get("prompt", [None, None, {}])[2]
            if (prompt.get(node_id, {}).get("inputs", {}).get(name) == value
                    and entry.get("status", {}).get("completed") is not None):
                return entry
        time.sleep(0.25)
    raise AssertionError(f"the frontend's prompt did not finish in {timeout}s\n{server.log_tail()}")


def test_frontend_shows_understanding_answer_on_the_node(server, tmp_path):
    """Queued from the real frontend, DSJanusUnderstand shows its answer in a read-only text box on the node; the
    answer is saved with the workflow, restored on load, and never sent back as a node input."""
    wf = json.loads((REPO / "workflows" / "janus_caption_image.json").read_text())
    question = f"What is in this picture? (frontend check {time.time_ns()})"  # unique: never served from cache
    for node in wf["nodes"]:
        if node["type"] == "DSJanusModelLoader":
            node["widgets_values"][0] = TINY_MODELS["pro"]
        if node["type"] == "DSJanusUnderstand":
            node["widgets_values"][:3] = [question, "per image", 24]
            understand = node
    node_id = understand["id"]
    errors: list[str] = []
    console: list[str] = []
    with frontend_page(server, errors, console, viewport={"width": 1600, "height": 1000}) as page:
        assert page.evaluate("() => window.app.extensions.some((e) => e.name === 'ComfyUI-Janus.ShowAnswer')")
        page.evaluate("(wf) => window.app.loadGraphData(wf, true, false)", wf)
        assert page.evaluate(ANSWER_STATE, node_id) is None, "no answer box before the node has run"
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        entry = _finished_entry(server, str(node_id), "question", question)
        assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
        answers = entry["outputs"][str(node_id)]["text"]
        assert answers and all(answers)
        text = "\n\n".join(answers)
        page.wait_for_function(f"() => ({ANSWER_STATE})({node_id})?.value", timeout=60_000)
        page.wait_for_timeout(500)  # let the canvas draw the resized node
        page.screenshot(path=str(Path(os.environ.get("JANUS_SCREENSHOT_DIR", tmp_path)) / "janus_answer.png"))
        state = page.evaluate(ANSWER_STATE, node_id)
        assert state["value"] == state["textarea"] == text
        assert state["readOnly"] is True
        x, y, w, h = state["box"]
        width, height = state["viewport"]
        assert w > 50 and h > 20 and 0 <= x and x + w <= width and 0 <= y and y + h <= height, state
        assert state["onTop"], f"the answer box is covered: {state}"

        # not a node input: the queued prompt (and so ComfyUI's cache key) is unchanged by the answer
        got = page.evaluate(FRONTEND_PROMPT, page.evaluate("() => window.app.graph.serialize()"))
        assert got["output"][str(node_id)]["inputs"] == ui_to_api(wf, server.object_info)[str(node_id)]["inputs"]
        # saved after the node's own widget values, and shown again when the saved workflow is loaded
        saved = next(n for n in got["saved"]["nodes"] if n["id"] == node_id)
        assert saved["widgets_values"] == understand["widgets_values"] + [text]
        restored = page.evaluate(ANSWER_STATE, node_id)
        assert restored["value"] == restored["textarea"] == text and restored["readOnly"] is True
        # a later run replaces the text in the same box; a batch's answers are separated by a blank line
        again = page.evaluate("""(nodeId) => {
            const node = window.app.graph.getNodeById(nodeId);
            node.onExecuted({text: ["first answer", "second answer"]});
            return node.widgets.filter((w) => w.name === "answer").map((w) => w.value);
        }""", node_id)
        assert again == ["first answer\n\nsecond answer"]
        # a workflow without the node loads and converts as before
        t2i = json.loads((REPO / "workflows" / "janus_pro_text_to_image.json").read_text())
        got = page.evaluate(FRONTEND_PROMPT, t2i)
        assert_same_prompt(server, got["output"], ui_to_api(t2i, server.object_info), "janus_pro_text_to_image.json")
    assert not errors, errors
    assert not [m for m in console if m.startswith("error") and ("Janus" in m or "janus" in m)], console
