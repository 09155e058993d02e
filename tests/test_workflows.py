"""The workflows in workflows/ are valid UI-format graphs that match our node definitions (no ComfyUI needed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from workflow_format import (
    CORE_NODES,
    VIRTUAL_NODES,
    check_ui_workflow,
    input_specs,
    is_widget,
    named_widgets,
    offline_object_info,
    ui_to_api,
)

from janus_core.hub import known_name
from nodes import NODE_CLASS_MAPPINGS
from nodes.loader import DOWNLOAD_SUFFIX, model_choices

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
FILES = sorted(WORKFLOWS.glob("*.json"))

# The node types each shipped workflow must contain (Notes aside).
EXPECTED = {
    "janus_pro_text_to_image.json": {"DSJanusModelLoader", "DSJanusPromptEncoder", "DSJanusCFGPair",
                                     "DSJanusARSampler", "DSJanusVQDecode", "SaveImage"},
    "janus_pro_upscale_chain.json": {"DSJanusModelLoader", "DSJanusPromptEncoder", "DSJanusCFGPair",
                                     "DSJanusARSampler", "DSJanusVQDecode", "ImageScaleBy", "SaveImage"},
    "janusflow_text_to_image.json": {"DSJanusModelLoader", "DSJanusPromptEncoder", "DSJanusCFGPair",
                                     "DSJanusFlowSampler", "VAELoader", "VAEDecode", "SaveImage"},
    "janus_caption_image.json": {"DSJanusModelLoader", "LoadImage", "DSJanusUnderstand", "PreviewAny"},
    "janusflow_img2img.json": {"DSJanusModelLoader", "DSJanusPromptEncoder", "DSJanusCFGPair", "LoadImage",
                               "ImageScale", "VAELoader", "VAEEncode", "DSJanusFlowSampler", "VAEDecode",
                               "SaveImage"},
    "janus4o_edit_image.json": {"DSJanusModelLoader", "DSJanusPromptEncoder", "LoadImage", "DSJanusCFGPair",
                                "DSJanusARSampler", "DSJanusVQDecode", "SaveImage"},
    "janus_pro_inpaint.json": {"DSJanusModelLoader", "DSJanusPromptEncoder", "LoadImage", "DSJanusCFGPair",
                               "DSJanusVQEncode", "DSJanusARSampler", "DSJanusVQDecode", "SaveImage"},
}
# Workflows laid out so the AR sampler's live preview (drawn under the node) covers no other node.
PREVIEW_CLEAR = ("janus4o_edit_image.json", "janus_pro_inpaint.json")
PREVIEW_HEIGHT = 512  # px the frontend's preview takes below a sampler
TITLE_HEIGHT = 30  # a node's title bar sits above its pos

# Widget names of the core nodes we use, in widgets_values order.
CORE_WIDGETS = {
    "SaveImage": ["filename_prefix"],
    "ImageScaleBy": ["upscale_method", "scale_by"],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "VAELoader": ["vae_name"],
    "VAEDecode": [],
    "VAEEncode": [],
    "LoadImage": ["image"],  # + the upload button's value ("image")
    "PreviewAny": [],
}


def model_value_ok(value: object) -> bool:
    """The loader's combo may name a known release that is not downloaded yet."""
    if not isinstance(value, str):
        return False
    return value in model_choices() or known_name(value.removesuffix(DOWNLOAD_SUFFIX)) is not None


EXEMPT = {("DSJanusModelLoader", "model"): model_value_ok, ("VAELoader", "vae_name"): lambda v: isinstance(v, str),
          ("LoadImage", "image"): lambda v: isinstance(v, str)}


@pytest.fixture(scope="module")
def object_info() -> dict:
    return offline_object_info(NODE_CLASS_MAPPINGS)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_shipped_workflows_present():
    assert {p.name for p in FILES} >= set(EXPECTED)


def test_core_table_covers_core_widgets(object_info):
    for ntype, names in CORE_WIDGETS.items():
        info = object_info[ntype]
        assert [n for n, spec, _ in input_specs(info) if is_widget(spec)] == names
        values = ["x.png", "image"] if ntype == "LoadImage" else [None] * len(names)
        assert list(named_widgets({"id": 1, "type": ntype, "widgets_values": values}, info)) == names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_workflow_is_valid(path: Path, object_info):
    wf = load(path)
    assert check_ui_workflow(wf, object_info, EXEMPT) == []
    types = {n["type"] for n in wf["nodes"]}
    unknown = types - set(NODE_CLASS_MAPPINGS) - set(CORE_NODES) - VIRTUAL_NODES
    assert not unknown, f"node types that are neither ours nor known core nodes: {unknown}"
    if path.name in EXPECTED:
        assert types - VIRTUAL_NODES == EXPECTED[path.name]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_workflow_has_download_note(path: Path):
    notes = [n for n in load(path)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, "every workflow says what to download where"
    text = " ".join(str(v) for n in notes for v in n["widgets_values"])
    assert "models/Janus" in text and "deepseek-ai/" in text
    if any(n["type"] == "VAELoader" for n in load(path)["nodes"]):
        assert "models/vae" in text and "sdxl_vae.safetensors" in text


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_widget_values_follow_input_types(path: Path, object_info):
    """Spot-check the positional mapping: seeds carry a control value, samplers get their own parameters."""
    for node in load(path)["nodes"]:
        if node["type"] not in NODE_CLASS_MAPPINGS:
            continue
        widgets = named_widgets(node, object_info[node["type"]])
        if "seed" in widgets:
            assert widgets["seed"][2] and widgets["seed"][2][0] in ("fixed", "increment", "decrement", "randomize")
        if node["type"] == "DSJanusModelLoader":
            assert widgets["dtype"][0] == "auto" and widgets["variant"][0] == "auto"
            flow = "Flow" in widgets["model"][0]
            assert flow == ("janusflow" in path.name)
        if node["type"] == "DSJanusARSampler":
            assert widgets["cfg_weight"][0] == 5.0 and widgets["temperature"][0] == 1.0
        if node["type"] == "DSJanusFlowSampler":
            assert widgets["steps"][0] == 30 and widgets["cfg_weight"][0] == 2.0
            latent = next(i for i in node["inputs"] if i["name"] == "latent")
            assert (latent["link"] is not None) == ("img2img" in path.name)
            assert (widgets["denoise"][0] < 1.0) == ("img2img" in path.name)


# ComfyUI's frontend (1.27) draws a sampler's live preview inside the node, below its widgets, and makes a shorter
# node taller to fit it (widgets + 220 px): the node then grows over whatever lies below it. The workflows give
# each sampler room for the preview (about its width) and keep every other node out of its column below its top,
# so a preview never covers a node (tests/test_comfyui_server.py checks it in the real frontend).
SAMPLERS = ("DSJanusARSampler", "DSJanusFlowSampler")
SAMPLER_MIN_HEIGHT = 600
TITLE_HEIGHT = 30  # LiteGraph draws the title above pos


def box(node: dict) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of a node on the canvas, title included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_sampler_previews_cover_no_node(path: Path):
    nodes = load(path)["nodes"]
    for sampler in (n for n in nodes if n["type"] in SAMPLERS):
        assert sampler["size"][1] >= SAMPLER_MIN_HEIGHT, f"node {sampler['id']} has no room for its preview"
        left, top, right, _ = box(sampler)
        for other in nodes:
            o_left, _, o_right, o_bottom = box(other)
            below = o_bottom > top and o_left < right and o_right > left
            assert other is sampler or not below, f"node {other['id']} ({other['type']}) lies under the preview " \
                                                  f"of node {sampler['id']}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_converts_to_api_prompt(path: Path, object_info):
    wf = load(path)
    prompt = ui_to_api(wf, object_info)
    real = [n for n in wf["nodes"] if n["type"] not in VIRTUAL_NODES]
    assert set(prompt) == {str(n["id"]) for n in real}
    for node_id, entry in prompt.items():
        info = object_info[entry["class_type"]]
        for name in info["input"].get("required", {}):
            assert name in entry["inputs"], f"{node_id}.{name} missing"
        for value in entry["inputs"].values():
            if isinstance(value, list):  # a link: [source node id, output slot]
                assert value[0] in prompt and value[1] < len(object_info[prompt[value[0]]["class_type"]]["output"])
    assert any(object_info[e["class_type"]]["output_node"] for e in prompt.values())


def _links_to(wf: dict, node_id: int) -> dict[str, tuple[str, int]]:
    """``{input name: (source node type, source slot)}`` of the linked inputs of node ``node_id``."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    target = nodes[node_id]
    return {inp["name"]: (nodes[link[1]]["type"], link[2]) for inp in target.get("inputs") or []
            for link in wf["links"] if link[0] == inp.get("link")}


def test_editing_workflows_wire_the_image_inputs():
    edit = load(WORKFLOWS / "janus4o_edit_image.json")
    pair = _links_to(edit, _node(edit, "DSJanusCFGPair")["id"])
    assert pair["image"] == ("LoadImage", 0)
    assert named_widgets(_node(edit, "DSJanusModelLoader"), offline_object_info(NODE_CLASS_MAPPINGS)[
        "DSJanusModelLoader"])["model"][0] == "Janus-4o-7B"
    inpaint = load(WORKFLOWS / "janus_pro_inpaint.json")
    sampler = _links_to(inpaint, _node(inpaint, "DSJanusARSampler")["id"])
    assert sampler["init_tokens"] == ("DSJanusVQEncode", 0) and sampler["mask"] == ("LoadImage", 1)
    assert _links_to(inpaint, _node(inpaint, "DSJanusVQEncode")["id"])["image"] == ("LoadImage", 0)


@pytest.mark.parametrize("name", PREVIEW_CLEAR)
def test_sampler_preview_covers_no_node(name):
    wf = load(WORKFLOWS / name)
    for sampler in (n for n in wf["nodes"] if n["type"] in ("DSJanusARSampler", "DSJanusFlowSampler")):
        x, y = sampler["pos"]
        w, h = sampler["size"]
        preview = (x, y + h, x + w, y + h + PREVIEW_HEIGHT)
        for node in wf["nodes"]:
            if node is sampler:
                continue
            nx, ny = node["pos"]
            nw, nh = node["size"]
            box = (nx, ny - TITLE_HEIGHT, nx + nw, ny + nh)
            overlap = box[0] < preview[2] and preview[0] < box[2] and box[1] < preview[3] and preview[1] < box[3]
            assert not overlap, f"{node['type']} {box} lies under the preview {preview} of {sampler['type']}"


# The checker itself catches what it should.

def _t2i() -> dict:
    return load(WORKFLOWS / "janus_pro_text_to_image.json")


def _node(wf: dict, ntype: str) -> dict:
    return next(n for n in wf["nodes"] if n["type"] == ntype)


@pytest.mark.parametrize("breakage, message", [
    (lambda wf: _node(wf, "DSJanusARSampler")["widgets_values"].pop(1), "widget values"),
    (lambda wf: _node(wf, "DSJanusARSampler")["widgets_values"].__setitem__(2, 99.0), "outside"),
    (lambda wf: _node(wf, "DSJanusCFGPair")["widgets_values"].__setitem__(0, 0), "outside"),
    (lambda wf: _node(wf, "DSJanusModelLoader")["widgets_values"].__setitem__(1, "int3"), "not in"),
    (lambda wf: _node(wf, "DSJanusModelLoader")["widgets_values"].__setitem__(0, "nowhere"), "not in"),
    (lambda wf: _node(wf, "DSJanusARSampler")["widgets_values"].__setitem__(1, "sometimes"), "control"),
    (lambda wf: wf["links"][0].__setitem__(5, "IMAGE"), "type"),
    (lambda wf: wf["links"][0].__setitem__(4, 1), "slot"),
    (lambda wf: _node(wf, "SaveImage").__setitem__("type", "SaveImageX"), "unknown node type"),
    (lambda wf: wf.pop("links"), "missing"),
    (lambda wf: wf.__setitem__("last_link_id", 1), "last_link_id"),
])
def test_checker_catches_broken_workflows(breakage, message, object_info):
    wf = copy.deepcopy(_t2i())
    breakage(wf)
    problems = check_ui_workflow(wf, object_info, EXEMPT)
    assert problems and any(message in p for p in problems), problems
