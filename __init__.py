"""ComfyUI entry point of ComfyUI-Janus: node classes and the web/ extension; nothing heavy happens at import."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # lets the nodes import `janus_core`; appended so ComfyUI's own modules win
    sys.path.append(_HERE)

WEB_DIRECTORY = "./web"  # frontend extension: shows DSJanusUnderstand's answer on the node

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
if __package__:  # imported as a package (ComfyUI); pytest may import this file as a plain module
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
