"""VQ-16 image tokenizer used by Janus / Janus-Pro for image generation (spec §2.4).

Convolutional encoder/decoder (GroupNorm(32, eps 1e-6), swish, ResNet and single-head attention blocks)
around an l2-normalised codebook. Downsampling factor is ``2 ** (len(ch_mult) - 1)`` (16 for the released
models: 384 px <-> 24x24 codes). Codes are in raster order: token i sits at row ``i // w``, column ``i % w``.
The checkpoint's ``quantize.codebook_used`` buffer is a training statistic and is not built here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from janus_core import precision
from janus_core.errors import JanusError

GN_GROUPS = 32
GN_EPS = 1e-6


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) that runs in the form :func:`janus_core.precision.conv_form`
    picks: float32 3x3 convolutions on the CPU through NNPACK's Winograd transform."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        form = precision.conv_form(weight.dtype, weight.device.type, self.kernel_size, self.stride, self.dilation,
                                   self.groups, precision.nnpack_available())
        if form == precision.WINOGRAD and self.padding_mode == "zeros" and x.dim() == 4:
            return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, list(self.padding))
        return super()._conv_forward(x, weight, bias)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus (1x1 ``nin_shortcut``) skip.

    [B, in_ch, H, W] -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_ch, H, W] -> [B, out_ch, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions (scale C^-0.5), residual.

    [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        b, c, hh, ww = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]
            return t.reshape(b, c, hh * ww).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then conv3x3 stride 2: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2]."""
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2 (computed in float32, cast back to the input dtype), then conv3x3.

    [B, C, H, W] -> [B, C, 2H, 2W].
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        up = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        return self.conv(up)


class _Level(nn.Module):
    """One resolution level: ``res.{j}`` ResNet blocks, optional interleaved ``attn.{j}``, optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, with_attn: bool, resample: str | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(n_blocks))
        self.attn = (
            nn.ModuleList(AttnBlock(out_ch) for _ in range(n_blocks)) if with_attn else nn.ModuleList()
        )
        if resample == "down":
            self.downsample = Downsample(out_ch)
        elif resample == "up":
            self.upsample = Upsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_ch, H, W] -> [B, out_ch, H', W'] (H' = H/2, 2H or H depending on the resampler)."""
        for j, res in enumerate(self.res):
            x = res(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _mid(channels: int) -> nn.ModuleList:
    return nn.ModuleList(
        [ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)]
    )


class Encoder(nn.Module):
    """Image -> latent: [B, 3, H, W] -> [B, z_channels, H/f, W/f] with f = 2 ** (len(ch_mult) - 1).

    Attention blocks only at the deepest level.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = Conv2d(3, ch, 3, padding=1)
        blocks = []
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            last = i == n - 1
            blocks.append(_Level(block_in, block_out, num_res_blocks, last, None if last else "down"))
            block_in = block_out
        self.conv_blocks = nn.ModuleList(blocks)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, z_channels, H/f, W/f]."""
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: [B, z_channels, h, w] -> [B, 3, h*f, w*f].

    ``conv_blocks`` are stored deepest level first; attention blocks only in ``conv_blocks.0``; each level
    has ``num_res_blocks + 1`` ResNet blocks and all but the last end with an upsample.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int) -> None:
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        blocks = []
        for i, mult in enumerate(reversed(ch_mult)):
            block_out = ch * mult
            last = i == n - 1
            blocks.append(_Level(block_in, block_out, num_res_blocks + 1, i == 0, None if last else "up"))
            block_in = block_out
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z_channels, h, w] -> [B, 3, h*f, w*f]."""
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# Peak activations of the decoder and of the encoder in tensors of their widest level (a ResNet block at full
# resolution holds its input, the level input, GroupNorm / swish / conv results): 6.01 measured on the CPU in
# float32 and bfloat16 for both.
PEAK_TENSORS = 7


def decoder_activation_bytes(ch: int, ch_mult: Sequence[int], grid: tuple[int, int], batch: int,
                             dtype: torch.dtype) -> int:
    """Peak bytes of :class:`Decoder` activations for ``batch`` latents of ``grid`` codes in ``dtype``.

    Level ``i`` (deepest first) works with ``ch * ch_mult[-1 - i]`` channels at ``2 ** i`` times the grid and
    upsamples to twice that; the largest ``channels x pixels`` of any level sets the peak (the full-resolution
    levels: 128 x 384 x 384 per image, 0.23 GB in bfloat16, for the released VQ-16).
    """
    pixels = grid[0] * grid[1]
    n = len(ch_mult)
    widest = max(ch * mult * pixels * 4 ** min(i + 1, n - 1) for i, mult in enumerate(reversed(ch_mult)))
    return PEAK_TENSORS * batch * widest * dtype.itemsize


def encoder_activation_bytes(ch: int, ch_mult: Sequence[int], codebook_size: int, image_size: int, batch: int,
                             dtype: torch.dtype) -> int:
    """Peak bytes of :meth:`VQModel.encode_to_codes` for ``batch`` square images of ``image_size`` pixels in ``dtype``.

    The larger of the encoder and the codebook search. Encoder level ``i`` works with ``ch * ch_mult[i]`` channels
    at ``image_size / 2 ** i``; the widest ``channels x pixels`` sets the peak (the full-resolution level:
    128 x 384 x 384 per image, 0.23 GB in bfloat16, for the released VQ-16). The search holds the float32
    similarities of every latent to every codebook entry (38 MB per image for the releases).
    """
    widest = max(ch * mult * (image_size // 2 ** i) ** 2 for i, mult in enumerate(ch_mult))
    latents = (image_size // 2 ** (len(ch_mult) - 1)) ** 2
    return batch * max(PEAK_TENSORS * widest * dtype.itemsize, 2 * latents * codebook_size * 4)


class VectorQuantizer(nn.Module):
    """Holds the codebook ``embedding`` [codebook_size, codebook_embed_dim]; entries are used l2-normalised."""

    def __init__(self, codebook_size: int, codebook_embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, codebook_embed_dim)

    def normalized_codebook(self) -> torch.Tensor:
        """[codebook_size, codebook_embed_dim], rows l2-normalised."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)


class VQModel(nn.Module):
    """VQ-16 tokenizer: ``encoder``, ``quant_conv``, ``quantize``, ``post_quant_conv``, ``decoder``."""

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        z_channels: int = 256,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        num_res_blocks: int = 2,
    ) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult:
            raise JanusError("VQ ch_mult must not be empty; fix gen_vision_config.")
        self.codebook_size = codebook_size
        self.codebook_embed_dim = codebook_embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quant_conv = Conv2d(z_channels, codebook_embed_dim, 1)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim)
        self.post_quant_conv = Conv2d(codebook_embed_dim, z_channels, 1)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)

    def codebook_entries(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """codes [B, N] integer (N = h*w, raster order) -> l2-normalised entries [B, codebook_embed_dim, h, w]."""
        h, w = grid
        if codes.ndim != 2 or codes.shape[1] != h * w:
            raise JanusError(
                f"VQ codes must have shape [B, {h * w}] for grid {h}x{w}, got {list(codes.shape)}."
            )
        codes = codes.long()
        if codes.numel() > 0 and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise JanusError(
                f"VQ codes must lie in [0, {self.codebook_size}), got range "
                f"[{int(codes.min())}, {int(codes.max())}]; the tokens do not belong to this tokenizer."
            )
        entries = F.embedding(codes, self.quantize.normalized_codebook())  # [B, N, D]
        return entries.reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, codebook_embed_dim, h, w] -> image [B, 3, f*h, f*w] (nominal range [-1, 1])."""
        return self.decoder(self.post_quant_conv(zq))

    def decode_code(self, codes: torch.Tensor, grid: tuple[int, int] = (24, 24)) -> torch.Tensor:
        """codes [B, h*w] -> image [B, 3, f*h, f*w] (f = 16 for VQ-16), nominal range [-1, 1]."""
        zq = self.codebook_entries(codes, grid).to(self.post_quant_conv.weight.dtype)
        return self.decode(zq)

    def encode_to_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] (H, W multiples of f) -> codes LongTensor [B, (H/f)*(W/f)].

        Each latent vector and each codebook row is l2-normalised; the code is the nearest entry (equivalently
        the highest cosine similarity).
        """
        f = self.downsample_factor
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
            raise JanusError(
                f"VQ encoder expects pixels [B, 3, H, W] with H and W multiples of {f}, got {list(pixels.shape)}."
            )
        z = self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype)))  # [B, D, h, w]
        b, d, h, w = z.shape
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(b, h * w, d).float(), p=2, dim=-1)
        codebook = self.quantize.normalized_codebook().float()  # [K, D]
        return torch.argmax(z @ codebook.t(), dim=-1)
