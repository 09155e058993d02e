"""JanusFlow's shallow U-ViT encoder/decoder around the LLM (spec §2.6, §4.4).

The encoder patchifies a 4-channel SDXL-VAE latent [B,4,48,48] to [B,C,24,24] (C=768 in JanusFlow-1.3B) and
embeds the flow time step into the LLM width (2048); the decoder maps the LLM output back, concatenated with
the encoder skip, to a velocity [B,4,48,48]. State-dict keys match the original `vision_gen_enc_model.*` and
`vision_gen_dec_model.*` sub-dicts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNextBlock",
    "GlobalResponseNorm",
    "RMSNorm",
    "ShallowUViTDecoder",
    "ShallowUViTEncoder",
    "TimestepEmbedding",
    "convnext_activation_bytes",
    "timestep_embedding",
]


# Peak activations of a ConvNeXt stack (block input, depthwise and normed copies, the 4x-wide MLP and its global
# response norm), in tensors of the stack's width: 14 measured on the CPU in float32 and bfloat16.
CONVNEXT_PEAK_WIDTHS = 16


def convnext_activation_bytes(channels: int, positions: int, batch: int, dtype: torch.dtype) -> int:
    """Peak bytes of the activations of a :class:`_MidBlock` of ``channels`` over ``positions`` pixels, ``batch``
    images in ``dtype`` (a memory estimate for the encoder, width ``block_out_channels``, and the decoder, width
    ``in_channels + skip``)."""
    return CONVNEXT_PEAK_WIDTHS * batch * channels * positions * dtype.itemsize


class RMSNorm(nn.Module):
    """Llama-style RMS norm over the last dim: [..., dim] -> [..., dim].

    Statistics are computed in float32; the normalised value is cast back to the input dtype before the
    weight multiply (as `LlamaRMSNorm`).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response norm on NHWC input: [B,H,W,dim] -> [B,H,W,dim]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # [B,1,1,dim]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.bias + (self.weight * nx + 1) * x


class ConvNextBlock(nn.Module):
    """ConvNeXt block with time-conditioned affine modulation after the residual add.

    forward(x [B,C,H,W], c [B,cond_dim]) -> [B,C,H,W].
    """

    def __init__(self, channels: int, cond_dim: int, norm_eps: float = 1e-6, mlp_ratio: int = 4) -> None:
        super().__init__()
        inner = channels * mlp_ratio
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=True)
        self.norm = RMSNorm(channels, norm_eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner)
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels)
        self.cond_embeds_mapper = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        residual = x
        h = self.depthwise(x).permute(0, 2, 3, 1)  # NHWC
        h = self.norm(h)
        h = self.channelwise_linear_1(h)
        h = F.gelu(h)
        h = self.channelwise_norm(h)
        h = self.channelwise_linear_2(h)
        x = h.permute(0, 3, 1, 2) + residual
        scale, shift = self.cond_embeds_mapper(F.silu(c)).chunk(2, dim=1)
        return shift[:, :, None, None] + x * (1 + scale[:, :, None, None])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal time-step features, cos half first: t [B] -> [B, dim] float32.

    freqs_k = exp(-ln(max_period) * k / (dim // 2)); out = [cos(t*freqs), sin(t*freqs)] (zero-padded if dim
    is odd).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t.reshape(-1).to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP with SiLU: [B, in_dim] -> [B, hidden]."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _MidBlock(nn.Module):
    """A stack of ConvNextBlocks sharing one condition: x [B,C,H,W], c [B,cond_dim] -> [B,C,H,W]."""

    def __init__(self, channels: int, cond_dim: int, num_blocks: int, norm_eps: float) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ConvNextBlock(channels, cond_dim, norm_eps=norm_eps) for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, c)
        return x


class _Unpatchify(nn.Module):
    """RMSNorm over channels, 1x1 conv and PixelShuffle: [B,C,H,W] -> [B,out,H*p,W*p]."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, norm_eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(in_channels, norm_eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch_size * patch_size, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.pixel_shuffle(self.unpatch_conv(x))


class ShallowUViTEncoder(nn.Module):
    """Latent + time step -> U-ViT features and time embedding.

    forward(x [B,in,H,W], t [B]) -> (x_emb [B,C,H/s,W/s], t_emb [B,hidden], [x_emb]) with C=block_out_channels.
    """

    def __init__(
        self,
        input_channels: int = 4,
        block_out_channels: int = 768,
        hidden_size: int = 2048,
        kernel_size: int = 2,
        stride: int = 2,
        padding: int = 0,
        layers_in_middle: int = 2,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.block_out_channels = block_out_channels
        self.time_embed = TimestepEmbedding(block_out_channels, hidden_size)
        self.in_conv = nn.Conv2d(
            input_channels, block_out_channels, kernel_size=kernel_size, stride=stride, padding=padding
        )
        self.mid_block = _MidBlock(block_out_channels, hidden_size, layers_in_middle, norm_eps)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        t_feat = timestep_embedding(t, self.block_out_channels).to(x.dtype)  # [B, C]
        t_emb = self.time_embed(t_feat)  # [B, hidden]
        x_emb = self.mid_block(self.in_conv(x), t_emb)
        return x_emb, t_emb, [x_emb]


class ShallowUViTDecoder(nn.Module):
    """LLM features + encoder skip -> velocity.

    forward(x [B,in,h,w], hs [..., skip [B,skip,h,w]], t_emb [B,hidden]) -> [B,out,h*2**upsamples,w*2**upsamples].
    Only the last element of `hs` is used; the caller's list is left unchanged.
    """

    def __init__(
        self,
        in_channels: int = 768,
        out_channels: int = 4,
        hidden_size: int = 2048,
        upsamples: int = 1,
        layers_in_middle: int = 2,
        norm_eps: float = 1e-6,
        *,
        skip_channels: int | None = None,
    ) -> None:
        super().__init__()
        if upsamples < 1:
            raise ValueError(f"upsamples must be >= 1, got {upsamples}")
        skip = in_channels if skip_channels is None else skip_channels
        width = in_channels + skip
        self.input_norm = RMSNorm(in_channels, norm_eps)
        self.mid_block = _MidBlock(width, hidden_size, layers_in_middle, norm_eps)
        # One x2 unpatchify stage per upsample, as in the original (only the last emits out_channels).
        self.out_convs = nn.ModuleList()
        for i in range(upsamples):
            stage_in = width if i == 0 else skip
            stage_out = out_channels if i == upsamples - 1 else skip
            self.out_convs.append(_Unpatchify(stage_in, stage_out, 2, norm_eps))

    def forward(self, x: torch.Tensor, hs: list[torch.Tensor], t_emb: torch.Tensor) -> torch.Tensor:
        if not hs:
            raise ValueError("ShallowUViTDecoder needs the encoder skip tensor in `hs`, got an empty list")
        x = self.input_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.cat([x, hs[-1]], dim=1)
        x = self.mid_block(x, t_emb)
        for stage in self.out_convs:
            x = stage(x)
        return x
