// ComfyUI-Janus frontend extension: shows the answer of "Janus Image Understanding" (DSJanusUnderstand) on the node.
//
// The node returns {"ui": {"text": [answer, ...]}}; the frontend hands that to node.onExecuted. We put the answers
// (joined by a blank line) into a read-only multiline text widget named "answer". The widget is saved with the
// workflow (last entry of widgets_values) and restored when the workflow is loaded again, but it is not a node
// input: it is left out of the queued prompt, so it never changes what runs or what ComfyUI caches.
// Other node types are not touched.

import { app } from "../../scripts/app.js";
import * as widgets from "../../scripts/widgets.js";

const NODE_TYPE = "DSJanusUnderstand";
const WIDGET_NAME = "answer";

function findAnswerWidget(node) {
    return node.widgets?.find((w) => w.name === WIDGET_NAME);
}

function createAnswerWidget(node) {
    let widget = null;
    try {
        const make = widgets.ComfyWidgets?.STRING;
        widget = make ? make(node, WIDGET_NAME, ["STRING", { multiline: true }], app)?.widget : null;
    } catch (error) {
        console.warn("[ComfyUI-Janus] multiline widget unavailable, using a text widget", error);
        widget = findAnswerWidget(node) ?? null;
    }
    widget ??= node.addWidget("text", WIDGET_NAME, "", () => {}, {});
    widget.options ??= {};
    widget.options.serialize = false; // not sent with the prompt (it is no input of the node)
    const el = widget.inputEl;
    if (el) {
        el.readOnly = true;
        el.placeholder = "";
        el.style.opacity = "0.85";
        el.title = "Answer of the last run (read-only)";
    }
    return widget;
}

const EXTRA_HEIGHT = 120; // room given to a new answer box after a run (a restored node keeps its saved size)

function showAnswer(node, text, { grow = false } = {}) {
    let widget = findAnswerWidget(node);
    const created = !widget;
    widget ??= createAnswerWidget(node);
    widget.value = text;
    if (widget.inputEl && widget.inputEl.value !== text) widget.inputEl.value = text;
    // make the node big enough for the new box; never shrink what the user sized
    const wanted = node.computeSize?.();
    if (wanted && node.size) {
        const extra = created && grow ? EXTRA_HEIGHT : 0;
        const size = [Math.max(node.size[0], wanted[0]), Math.max(node.size[1] + extra, wanted[1])];
        if (size[0] !== node.size[0] || size[1] !== node.size[1]) node.setSize?.(size);
    }
    node.setDirtyCanvas?.(true, true);
}

function answersText(message) {
    const text = message?.text;
    if (text == null) return null;
    return (Array.isArray(text) ? text : [text]).map((t) => String(t)).join("\n\n");
}

app.registerExtension({
    name: "ComfyUI-Janus.ShowAnswer",

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_TYPE) return;

        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const result = onExecuted?.apply(this, arguments);
            try {
                const text = answersText(message);
                if (text != null) showAnswer(this, text, { grow: true });
            } catch (error) {
                console.error("[ComfyUI-Janus] could not show the answer", error);
            }
            return result;
        };

        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function (info) {
            const result = onConfigure?.apply(this, arguments);
            try {
                // a saved answer is the value after the node's own widgets; configure() already set it if the
                // widget exists, otherwise it is left over and we create the widget for it
                const values = info?.widgets_values;
                if (Array.isArray(values) && !findAnswerWidget(this)) {
                    const own = (this.widgets ?? []).filter((w) => w.serialize !== false).length;
                    if (values.length > own && typeof values[own] === "string") showAnswer(this, values[own]);
                }
            } catch (error) {
                console.error("[ComfyUI-Janus] could not restore the answer", error);
            }
            return result;
        };
    },
});
