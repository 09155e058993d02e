"""Conversions between decoder outputs and ComfyUI's IMAGE layout (``[B, H, W, 3]`` float32 0..1, CPU)."""

from __future__ import annotations

import torch


def images_from_decoded(decoded: torch.Tensor) -> torch.Tensor:
    """Decoder output ``[B, 3, H, W]`` nominally in [-1, 1] -> ``[B, H, W, 3]`` float32 0..1 on the CPU."""
    return ((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, 3]`` 0..1 -> uint8, truncating like the reference (and ComfyUI's Save Image)."""
    return (images * 255.0).clamp(0, 255).to(torch.uint8)
