"""ComfyUI workflow helpers for the tests: UI-format (canvas) checks and UI -> API ("prompt") conversion.

Works from an ``object_info`` mapping shaped like ComfyUI's ``GET /object_info`` answer: the real server's
(the real-ComfyUI test) or :func:`offline_object_info` (our node classes plus :data:`CORE_NODES`, a
hand-written copy of the few core nodes our workflows use, checked against a real server by that test).

The widget rules follow ComfyUI's frontend: every input whose type is a combo list or INT / FLOAT / STRING /
BOOLEAN is a widget, in ``input_order`` (required, then optional); an INT input named ``seed`` or
``noise_seed`` (or with ``control_after_generate``) is followed by a "control after generate" value;
an ``image_upload`` combo is followed by the upload button's value. Frontend-only nodes (notes, reroutes)
are not part of the API prompt.
"""

from __future__ import annotations

import copy
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UI_KEYS = ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")
NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "properties")

# Core ComfyUI nodes used by workflows/ (as /object_info shows them; tests/test_comfyui_server.py checks this
# table against a live server). Combo lists are given where they are fixed; None = the folder's files.
CORE_NODES: dict[str, dict[str, Any]] = {
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "input_order": {"required": ["images", "filename_prefix"]},
        "output": [], "output_name": [], "output_node": True,
    },
    "ImageScaleBy": {
        "input": {"required": {
            "image": ["IMAGE", {}],
            "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}],
            "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}],
        }},
        "input_order": {"required": ["image", "upscale_method", "scale_by"]},
        "output": ["IMAGE"], "output_name": ["IMAGE"], "output_node": False,
    },
    "ImageScale": {
        "input": {"required": {
            "image": ["IMAGE", {}],
            "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}],
            "width": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
            "height": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
            "crop": [["disabled", "center"], {}],
        }},
        "input_order": {"required": ["image", "upscale_method", "width", "height", "crop"]},
        "output": ["IMAGE"], "output_name": ["IMAGE"], "output_node": False,
    },
    "VAELoader": {
        "input": {"required": {"vae_name": [None, {}]}},
        "input_order": {"required": ["vae_name"]},
        "output": ["VAE"], "output_name": ["VAE"], "output_node": False,
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
        "input_order": {"required": ["samples", "vae"]},
        "output": ["IMAGE"], "output_name": ["IMAGE"], "output_node": False,
    },
    "VAEEncode": {
        "input": {"required": {"pixels": ["IMAGE", {}], "vae": ["VAE", {}]}},
        "input_order": {"required": ["pixels", "vae"]},
        "output": ["LATENT"], "output_name": ["LATENT"], "output_node": False,
    },
    "LoadImage": {
        "input": {"required": {"image": [None, {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "output_node": False,
    },
    "PreviewAny": {
        "input": {"required": {"source": ["*", {}]}},
        "input_order": {"required": ["source"]},
        "output": [], "output_name": [], "output_node": True,
    },
}


def node_info(cls: type) -> dict[str, Any]:
    """``/object_info`` entry of a V1 node class (the parts these helpers use)."""
    inputs = cls.INPUT_TYPES()
    info_inputs = {sect: {name: list(spec) for name, spec in inputs.get(sect, {}).items()}
                   for sect in ("required", "optional") if sect in inputs}
    return {
        "input": info_inputs,
        "input_order": {sect: list(v) for sect, v in info_inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def offline_object_info(mappings: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Our node classes plus :data:`CORE_NODES`, shaped like ``/object_info``."""
    info = copy.deepcopy(CORE_NODES)
    info.update({name: node_info(cls) for name, cls in mappings.items()})
    return info


def input_specs(info: dict[str, Any]) -> list[tuple[str, list, bool]]:
    """``(name, [type, options], optional)`` for every input, in the frontend's order."""
    order = info.get("input_order") or {sect: list(v) for sect, v in info["input"].items()}
    out = []
    for sect in ("required", "optional"):
        for name in order.get(sect, []):
            out.append((name, list(info["input"][sect][name]), sect == "optional"))
    return out


def spec_type(spec: list) -> Any:
    """The socket type of an input spec; combos (a list of values, or None = unknown files) -> "COMBO"."""
    kind = spec[0]
    return "COMBO" if kind is None or isinstance(kind, list) else kind


def spec_options(spec: list) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput", False)


def widget_slots(name: str, spec: list) -> int:
    """How many ``widgets_values`` entries the frontend stores for this widget input."""
    opts = spec_options(spec)
    if spec_type(spec) == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 2
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        return 2
    return 1


def combo_values(spec: list) -> list | None:
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return spec_options(spec).get("options")
    return None


def named_widgets(node: dict[str, Any], info: dict[str, Any]) -> dict[str, tuple[Any, list, list]]:
    """``{input name: (value, spec, extra values)}`` read from a UI node's ``widgets_values``.

    Raises ``ValueError`` when the count does not match the node's widget inputs.
    """
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some frontends save widgets by name
        values = list(values.values())
    widgets = [(name, spec) for name, spec, _ in input_specs(info) if is_widget(spec)]
    need = sum(widget_slots(name, spec) for name, spec in widgets)
    if len(values) != need:
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {need} "
                         f"for {[name for name, _ in widgets]}")
    out, i = {}, 0
    for name, spec in widgets:
        n = widget_slots(name, spec)
        out[name] = (values[i], spec, list(values[i + 1:i + n]))
        i += n
    return out


def check_widget_value(name: str, value: Any, spec: list, extra: list) -> list[str]:
    """Problems with one widget value (type, min/max, combo membership, control value)."""
    problems = []
    kind, opts = spec_type(spec), spec_options(spec)
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name}: {value!r} is not an INT")
        elif not opts.get("min", value) <= value <= opts.get("max", value):
            problems.append(f"{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
        if extra and extra[0] not in CONTROL_VALUES:
            problems.append(f"{name}: control_after_generate {extra[0]!r} not in {CONTROL_VALUES}")
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name}: {value!r} is not a FLOAT")
        elif not opts.get("min", value) <= value <= opts.get("max", value):
            problems.append(f"{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
    elif kind == "STRING":
        if not isinstance(value, str):
            problems.append(f"{name}: {value!r} is not a STRING")
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            problems.append(f"{name}: {value!r} is not a BOOLEAN")
    elif kind == "COMBO":
        choices = combo_values(spec)
        if not isinstance(value, str):
            problems.append(f"{name}: combo value {value!r} is not a string")
        elif choices is not None and value not in choices:
            problems.append(f"{name}: {value!r} not in {choices}")
    return problems


def types_compatible(output_type: str, input_type: Any) -> bool:
    """ComfyUI's rule, simplified: equal, or either side is "*", or comma-separated unions overlap."""
    if input_type == "*" or output_type == "*":
        return True
    if not isinstance(input_type, str):
        return False
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def check_ui_workflow(wf: dict[str, Any], object_info: dict[str, Any],
                      combo_exempt: dict[tuple[str, str], Any] | None = None) -> list[str]:
    """Every problem found in a UI-format workflow (empty list = valid).

    ``combo_exempt[(node type, input)]`` is a predicate accepting combo values outside the listed ones
    (e.g. a model the user has not downloaded yet).
    """
    combo_exempt = combo_exempt or {}
    problems: list[str] = []
    missing = [k for k in UI_KEYS if k not in wf]
    if missing:
        return [f"not a UI-format workflow: missing {missing}"]
    if wf["version"] != 0.4:
        problems.append(f"version {wf['version']!r}, expected 0.4")
    nodes = {}
    for node in wf["nodes"]:
        absent = [k for k in NODE_KEYS if k not in node]
        if absent:
            problems.append(f"node {node.get('id')}: missing {absent}")
            continue
        if node["id"] in nodes:
            problems.append(f"duplicate node id {node['id']}")
        nodes[node["id"]] = node
    if nodes and wf["last_node_id"] < max(nodes):
        problems.append(f"last_node_id {wf['last_node_id']} < highest node id {max(nodes)}")
    links = {}
    for link in wf["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            problems.append(f"link {link!r} is not [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        if link[0] in links:
            problems.append(f"duplicate link id {link[0]}")
        links[link[0]] = link
    if links and wf["last_link_id"] < max(links):
        problems.append(f"last_link_id {wf['last_link_id']} < highest link id {max(links)}")

    for node in nodes.values():
        ntype = node["type"]
        where = f"node {node['id']} ({ntype})"
        if ntype in VIRTUAL_NODES:
            continue
        info = object_info.get(ntype)
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        if node["properties"].get("Node name for S&R", ntype) != ntype:
            problems.append(f"{where}: 'Node name for S&R' is {node['properties']['Node name for S&R']!r}")
        specs = {name: (spec, optional) for name, spec, optional in input_specs(info)}
        # sockets
        for slot, inp in enumerate(node.get("inputs") or []):
            name = inp.get("name")
            if name not in specs:
                problems.append(f"{where}: input {name!r} is not an input of {ntype}")
                continue
            spec, optional = specs[name]
            if "widget" not in inp and spec_type(spec) != inp.get("type"):
                problems.append(f"{where}: input {name!r} has type {inp.get('type')!r}, node says {spec[0]!r}")
            lid = inp.get("link")
            if lid is None:
                if not optional and "widget" not in inp:
                    problems.append(f"{where}: required input {name!r} is not connected")
                continue
            link = links.get(lid)
            if link is None:
                problems.append(f"{where}: input {name!r} uses missing link {lid}")
            elif (link[3], link[4]) != (node["id"], slot):
                problems.append(f"{where}: link {lid} targets node {link[3]} slot {link[4]}, not slot {slot}")
        connected = {inp["name"] for inp in node.get("inputs") or []}
        for name, (spec, optional) in specs.items():
            if not optional and not is_widget(spec) and name not in connected:
                problems.append(f"{where}: required input {name!r} missing from its inputs")
        outputs = node.get("outputs") or []
        if len(outputs) != len(info["output"]):
            problems.append(f"{where}: {len(outputs)} outputs, node has {len(info['output'])}")
        for slot, out in enumerate(outputs):
            if slot < len(info["output"]) and out.get("type") != info["output"][slot]:
                problems.append(f"{where}: output {slot} type {out.get('type')!r}, node says {info['output'][slot]!r}")
            for lid in out.get("links") or []:
                link = links.get(lid)
                if link is None or (link[1], link[2]) != (node["id"], slot):
                    problems.append(f"{where}: output {slot} lists link {lid} that does not start here")
        # widgets
        try:
            widgets = named_widgets(node, info)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        for name, (value, spec, extra) in widgets.items():
            exempt = combo_exempt.get((ntype, name))
            if exempt is not None and exempt(value):
                continue
            problems += [f"{where}: {p}" for p in check_widget_value(name, value, spec, extra)]

    for lid, (_, src, src_slot, dst, dst_slot, ltype) in links.items():
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: node {src if src not in nodes else dst} does not exist")
            continue
        src_node, dst_node = nodes[src], nodes[dst]
        outs, ins = src_node.get("outputs") or [], dst_node.get("inputs") or []
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            problems.append(f"link {lid}: not listed by node {src} output {src_slot}")
            continue
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: not the link of node {dst} input {dst_slot}")
            continue
        if ltype != outs[src_slot]["type"]:
            problems.append(f"link {lid}: type {ltype!r} but node {src} output {src_slot} is "
                            f"{outs[src_slot]['type']!r}")
        src_info, dst_info = object_info.get(src_node["type"]), object_info.get(dst_node["type"])
        if src_info and dst_info:
            declared = src_info["output"][src_slot] if src_slot < len(src_info["output"]) else None
            specs = {name: spec for name, spec, _ in input_specs(dst_info)}
            target = specs.get(ins[dst_slot]["name"])
            if declared is not None and target is not None and not types_compatible(declared, spec_type(target)):
                problems.append(f"link {lid}: {declared} -> {ins[dst_slot]['name']} ({target[0]}) type mismatch")
    return problems


def ui_to_api(wf: dict[str, Any], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to the API prompt ComfyUI's ``POST /prompt`` takes.

    Skips frontend-only nodes and muted nodes (mode 2); bypassed nodes (mode 4) are not supported.
    """
    links = {link[0]: link for link in wf["links"]}
    nodes = {n["id"]: n for n in wf["nodes"]}
    prompt: dict[str, dict[str, Any]] = {}
    for node in wf["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise NotImplementedError(f"node {node['id']} is bypassed; bypass is not converted")
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {name: value for name, (value, _, _) in named_widgets(node, info).items()}
        for inp in node.get("inputs") or []:
            lid = inp.get("link")
            if lid is None:
                continue
            _, src, src_slot, _, _, _ = links[lid]
            if nodes[src]["type"] in VIRTUAL_NODES:
                raise NotImplementedError(f"link {lid} starts at a {nodes[src]['type']} node")
            inputs[inp["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt
