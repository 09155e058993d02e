"""janus_core: DeepSeek Janus, Janus-Pro and JanusFlow in plain PyTorch (no ComfyUI needed).

Public API (imported lazily so ``import janus_core`` stays cheap): ``load_model``, ``JanusModel``,
``generate_image_tokens``, ``score_image_tokens``, ``encode_image_tokens``, ``decode_image_tokens``,
``generate_flow_latents``, ``understand``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "janus_core.model",
    "JanusModel": "janus_core.model",
    "generate_image_tokens": "janus_core.generate_ar",
    "decode_image_tokens": "janus_core.generate_ar",
    "score_image_tokens": "janus_core.generate_ar",
    "encode_image_tokens": "janus_core.image_tokens",
    "generate_flow_latents": "janus_core.generate_flow",
    "understand": "janus_core.understanding",
    "JanusError": "janus_core.errors",
    "CheckpointError": "janus_core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'janus_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
