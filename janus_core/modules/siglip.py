"""SigLIP ViT image encoder used by Janus for understanding (spec §2.2).

A plain pre-norm ViT without class token: conv patch embedding, learned absolute position embedding,
``layers`` transformer blocks (LayerNorm eps 1e-6, non-causal multi-head attention, exact-GELU MLP) and a
final LayerNorm. The checkpoint's ``attn_pool.*`` head is never executed by Janus and is not built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from janus_core.errors import JanusError

LN_EPS = 1e-6


def vit_activation_bytes(width: int, mlp_ratio: float, tokens: int, batch: int, dtype: torch.dtype) -> int:
    """Peak bytes of a :class:`SigLIPViT`'s activations for ``batch`` images of ``tokens`` patches in ``dtype``.

    One block at a time holds its input, the normed copy, the attention output and the MLP's hidden layer
    before and after GELU: ``3 + 2 * mlp_ratio`` widths per token measured on the CPU; one more width here.
    """
    return int((4 + 2 * mlp_ratio) * width) * tokens * batch * dtype.itemsize


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: [B, 3, H, W] -> [B, (H/p)*(W/p), width] (row-major over the grid)."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, width]."""
        x = self.proj(pixels)
        return x.flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head non-causal self-attention with a fused qkv projection: [B, N, D] -> [B, N, D]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise JanusError(
                f"SigLIP width {width} is not divisible by heads {heads}; fix the vision config."
            )
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2: [.., D] -> [.., D]."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[.., D] -> [.., D]."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)). [B, N, D] -> [B, N, D]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SigLIPViT(nn.Module):
    """SigLIP vision transformer trunk (no pooling head).

    State-dict keys: ``patch_embed.proj.*``, ``pos_embed`` [1, N, width], ``blocks.{i}.{norm1,attn.qkv,
    attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*`` with N = (image_size / patch_size)^2.
    """

    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 16,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise JanusError(
                f"SigLIP image_size {image_size} is not a multiple of patch_size {patch_size}; fix the config."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=LN_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, image_size, image_size] (already normalised) -> features [B, N, width]."""
        if pixels.ndim != 4 or pixels.shape[-2:] != (self.image_size, self.image_size):
            raise JanusError(
                f"SigLIP expects pixels of shape [B, 3, {self.image_size}, {self.image_size}], "
                f"got {list(pixels.shape)}; resize/pad the image with the Janus image processor first."
            )
        x = self.patch_embed(pixels) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VisionTower(nn.Module):
    """Janus ``vision_model``: holds the ViT as ``vision_tower`` (keys ``vision_tower.*``).

    ``layers`` is the number of blocks actually run (the config's ``select_layer`` is applied by
    :func:`janus_core.config.siglip_spec`); feature selection is "same": the ViT output is returned unchanged.
    """

    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 16,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.vision_tower = SigLIPViT(image_size, patch_size, width, layers, heads, mlp_ratio)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> [B, N, width]."""
        return self.vision_tower(pixels)
