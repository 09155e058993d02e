"""The two composite networks, with the original checkpoints' top-level prefixes.

``JanusARNet`` (Janus-1.3B, Janus-Pro): ``vision_model``, ``aligner``, ``gen_vision_model``, ``gen_aligner``,
``gen_head``, ``gen_embed``, ``language_model``.
``JanusFlowNet`` (JanusFlow-1.3B): ``vision_und_enc_model``, ``vision_und_enc_aligner``, ``beg_of_und_embed``,
``vision_gen_enc_model``, ``vision_gen_enc_aligner``, ``vision_gen_dec_model``, ``language_model``,
``vision_gen_dec_aligner_norm``, ``vision_gen_dec_aligner``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import JanusConfig, LlamaSpec, SiglipSpec
from .projector import GenHead, MlpProjector
from .siglip import VisionTower
from .uvit import RMSNorm, ShallowUViTDecoder, ShallowUViTEncoder
from .vq import VQModel

# Top-level modules of both networks -> the precision component they belong to (janus_core.precision.COMPONENTS).
# Each component runs in one dtype; data is cast where it passes from one component to the next.
COMPONENT_OF = {
    "language_model": "llm", "gen_embed": "llm", "gen_aligner": "llm",
    "gen_head": "gen_head",
    "gen_vision_model": "vq",
    "vision_model": "vision", "aligner": "vision",
    "vision_und_enc_model": "vision", "vision_und_enc_aligner": "vision", "beg_of_und_embed": "vision",
    "vision_gen_enc_model": "flow", "vision_gen_enc_aligner": "flow", "vision_gen_dec_model": "flow",
    "vision_gen_dec_aligner_norm": "flow", "vision_gen_dec_aligner": "flow",
}


def build_llama(spec: LlamaSpec) -> nn.Module:
    """transformers ``LlamaForCausalLM`` of the given sizes (holds the weights; :mod:`janus_core.llm` runs it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        hidden_act=spec.hidden_act,
        tie_word_embeddings=False,  # config.llama_spec refuses tied releases
    )
    return LlamaForCausalLM(cfg)


def build_vision_tower(spec: SiglipSpec) -> VisionTower:
    return VisionTower(spec.image_size, spec.patch_size, spec.width, spec.layers, spec.heads, spec.mlp_ratio)


class JanusARNet(nn.Module):
    """Janus / Janus-Pro: SigLIP understanding encoder, VQ-16 image tokenizer, gen head, Llama LLM."""

    def __init__(self, cfg: JanusConfig):
        super().__init__()
        assert cfg.aligner and cfg.gen_aligner and cfg.gen_head and cfg.vq
        self.vision_model = build_vision_tower(cfg.siglip)
        self.aligner = MlpProjector(*cfg.aligner)
        vq = cfg.vq
        self.gen_vision_model = VQModel(vq.ch, vq.ch_mult, vq.z_channels, vq.codebook_size, vq.codebook_embed_dim)
        self.gen_aligner = MlpProjector(*cfg.gen_aligner)
        self.gen_head = GenHead(*cfg.gen_head)
        self.gen_embed = nn.Embedding(vq.codebook_size, vq.codebook_embed_dim)
        self.language_model = build_llama(cfg.llm)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels ``[N, 3, 384, 384]`` (any float dtype) -> LLM-space features ``[N, 576, hidden]`` in the
        vision encoder's dtype."""
        pixels = pixels.to(self.aligner.layers[0].weight.dtype)
        return self.aligner(self.vision_model(pixels))

    def image_token_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ ids ``[...]`` -> LLM input embeddings ``[..., hidden]`` (``gen_aligner(gen_embed(ids))``)."""
        return self.gen_aligner(self.gen_embed(codes))


class JanusFlowNet(nn.Module):
    """JanusFlow: SigLIP understanding encoder and ShallowUViT encoder/decoder around a Llama LLM."""

    def __init__(self, cfg: JanusConfig):
        super().__init__()
        assert cfg.flow
        f, hidden = cfg.flow, cfg.llm.hidden_size
        self.vision_und_enc_model = build_vision_tower(cfg.siglip)
        self.vision_und_enc_aligner = nn.Linear(cfg.siglip.width, hidden)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, hidden))
        self.vision_gen_enc_model = ShallowUViTEncoder(
            input_channels=f.latent_channels, block_out_channels=f.enc_channels, hidden_size=hidden,
            kernel_size=f.kernel_size, stride=f.stride, padding=f.padding,
            layers_in_middle=f.layers_in_middle_enc, norm_eps=f.norm_eps,
        )
        self.vision_gen_enc_aligner = nn.Linear(f.enc_channels, hidden)
        self.vision_gen_dec_model = ShallowUViTDecoder(
            in_channels=f.dec_channels, out_channels=f.dec_out_channels, hidden_size=hidden,
            upsamples=f.upsamples, layers_in_middle=f.layers_in_middle_dec, norm_eps=f.norm_eps,
            skip_channels=f.enc_channels,
        )
        self.language_model = build_llama(cfg.llm)
        self.vision_gen_dec_aligner_norm = RMSNorm(hidden, eps=cfg.llm.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(hidden, f.dec_channels)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels ``[N, 3, 384, 384]`` (any float dtype) -> ``[N, 577, hidden]`` in the vision encoder's dtype:
        begin-of-understanding row + 576 features."""
        pixels = pixels.to(self.vision_und_enc_aligner.weight.dtype)
        feats = self.vision_und_enc_aligner(self.vision_und_enc_model(pixels))
        boi = self.beg_of_und_embed.to(feats.dtype).expand(feats.shape[0], 1, -1)
        return torch.cat([boi, feats], dim=1)
