"""Parse the ``config.json`` of every Janus variant into one typed description.

Variants (the strings used everywhere in this package):

* ``"janus-1.3b"``: Janus-1.3B, autoregressive VQ generation, roles ``User``/``Assistant``.
* ``"janus-pro"``: Janus-Pro-1B and -7B, same architecture, roles ``<|User|>``/``<|Assistant|>``.
* ``"janusflow"``: JanusFlow-1.3B, rectified-flow generation in SDXL-VAE latent space.

Detection rule (overridable by passing ``variant=``): a config with ``vision_gen_enc_config`` is
JanusFlow; otherwise the model is Janus-Pro when its ``special_tokens_map.json`` lists ``<|User|>`` as an
additional special token (all Pro releases do), else Janus-1.3B.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, JanusError

logger = logging.getLogger(__name__)

VARIANTS = ("janus-1.3b", "janus-pro", "janusflow")
AR_VARIANTS = ("janus-1.3b", "janus-pro")

# The defaults of transformers' LlamaConfig at the time the checkpoints were saved. Janus-Pro-7B's
# language_config omits the sizes and relies on them; we state them here so a future transformers
# release that changes its defaults cannot change the model we build.
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
}

# SigLIP towers known by name (the original code's table); fixtures pass siglip_cfg_override instead.
SIGLIP_MODELS: dict[str, dict[str, Any]] = {
    "siglip_large_patch16_384": {
        "image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4.0,
    },
}

VQ16_DEFAULTS: dict[str, Any] = {
    "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "codebook_size": 16384, "codebook_embed_dim": 8,
}


@dataclass(frozen=True)
class LlamaSpec:
    """Effective language-model sizes (LlamaConfig defaults applied)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class SiglipSpec:
    """SigLIP ViT sizes; ``layers`` already accounts for ``select_layer``."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class VQSpec:
    ch: int
    ch_mult: tuple[int, ...]
    z_channels: int
    codebook_size: int
    codebook_embed_dim: int


@dataclass(frozen=True)
class FlowSpec:
    """JanusFlow UViT widths: ``enc_channels``/``dec_channels`` are 768 in the release."""

    enc_channels: int
    dec_channels: int
    latent_channels: int
    dec_out_channels: int
    layers_in_middle_enc: int
    layers_in_middle_dec: int
    kernel_size: int
    stride: int
    padding: int
    upsamples: int
    norm_eps: float


@dataclass(frozen=True)
class JanusConfig:
    """Everything needed to build a Janus model of any variant."""

    variant: str
    llm: LlamaSpec
    siglip: SiglipSpec
    # AR variants
    aligner: tuple[int, int, int] | None = None  # (input_dim, n_embed, depth)
    gen_aligner: tuple[int, int, int] | None = None
    gen_head: tuple[int, int, int] | None = None  # (n_embed, image_token_embed, image_token_size)
    vq: VQSpec | None = None
    # JanusFlow
    flow: FlowSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_flow(self) -> bool:
        return self.variant == "janusflow"

    @property
    def num_image_tokens(self) -> int:
        return self.siglip.num_patches


def _params(cfg: dict, key: str) -> dict:
    sub = cfg.get(key)
    if not isinstance(sub, dict):
        raise CheckpointError(f"config.json has no '{key}' section; this is not a Janus checkpoint config.")
    return dict(sub.get("params") or {})


def llama_spec(language_config: dict) -> LlamaSpec:
    """Apply LlamaConfig defaults to a (possibly partial) ``language_config``."""
    merged = {**LLAMA_DEFAULTS, **{k: v for k, v in language_config.items() if v is not None}}
    heads = int(merged["num_attention_heads"])
    return LlamaSpec(
        vocab_size=int(merged["vocab_size"]),
        hidden_size=int(merged["hidden_size"]),
        intermediate_size=int(merged["intermediate_size"]),
        num_hidden_layers=int(merged["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(merged.get("num_key_value_heads") or heads),
        max_position_embeddings=int(merged["max_position_embeddings"]),
        rms_norm_eps=float(merged["rms_norm_eps"]),
        rope_theta=float(merged["rope_theta"]),
        hidden_act=str(merged["hidden_act"]),
        tie_word_embeddings=bool(merged["tie_word_embeddings"]),
    )


def siglip_spec(params: dict) -> SiglipSpec:
    """SigLIP sizes from a ``vision_config.params`` dict (``siglip_cfg_override`` wins over the name)."""
    name = params.get("model_name", "siglip_large_patch16_384")
    base = params.get("siglip_cfg_override") or SIGLIP_MODELS.get(name)
    if base is None:
        raise CheckpointError(
            f"Unknown vision tower '{name}' in config.json; supported: {sorted(SIGLIP_MODELS)}."
        )
    layers = int(base["layers"])
    select_layer = int(params.get("select_layer", -1))
    if select_layer < 0:
        layers = layers + select_layer + 1
    elif select_layer > 0:
        layers = min(layers, select_layer)
    image_size = int(params.get("image_size", base["image_size"]))
    return SiglipSpec(image_size, int(base["patch_size"]), int(base["width"]), layers, int(base["heads"]),
                      float(base["mlp_ratio"]))


def _mlp(params: dict, what: str) -> tuple[int, int, int]:
    kind = params.get("projector_type", "mlp_gelu")
    if kind != "mlp_gelu":
        raise CheckpointError(f"{what}: projector_type '{kind}' is not supported (only 'mlp_gelu').")
    return int(params["input_dim"]), int(params["n_embed"]), int(params.get("depth", 2))


def _vq_spec(params: dict) -> VQSpec:
    merged = {**VQ16_DEFAULTS, **{k: v for k, v in params.items() if k in VQ16_DEFAULTS}}
    return VQSpec(int(merged["ch"]), tuple(int(c) for c in merged["ch_mult"]), int(merged["z_channels"]),
                  int(merged["codebook_size"]), int(merged["codebook_embed_dim"]))


def _flow_spec(cfg: dict) -> FlowSpec:
    enc = _params(cfg, "vision_gen_enc_config")
    dec = _params(cfg, "vision_gen_dec_config")
    return FlowSpec(
        enc_channels=int(enc.get("block_out_channels", [768])[-1]),
        dec_channels=int(dec.get("in_channels", 768)),
        latent_channels=int(enc.get("input_channels", 4)),
        dec_out_channels=int(dec.get("out_channels", 4)),
        layers_in_middle_enc=int(enc.get("layers_in_middle", 2)),
        layers_in_middle_dec=int(dec.get("layers_in_middle", 2)),
        kernel_size=int(enc.get("kernel_size", 2)),
        stride=int(enc.get("stride", 2)),
        padding=int(enc.get("padding", 0)),
        upsamples=int(dec.get("upsamples", 1)),
        norm_eps=float(enc.get("norm_eps", 1e-6)),
    )


def detect_variant(cfg: dict, folder: Path | None = None) -> str:
    """Variant from the config (and the folder's special_tokens_map.json); see the module docstring."""
    if "vision_gen_enc_config" in cfg:
        return "janusflow"
    if folder is not None:
        stm = folder / "special_tokens_map.json"
        if stm.is_file():
            extra = json.loads(stm.read_text(encoding="utf-8")).get("additional_special_tokens") or []
            names = {t["content"] if isinstance(t, dict) else t for t in extra}
            if "<|User|>" in names:
                return "janus-pro"
    return "janus-1.3b"


def parse_config(cfg: dict, variant: str | None = None, folder: Path | None = None) -> JanusConfig:
    """Build a :class:`JanusConfig` from a parsed ``config.json``.

    ``variant`` forces the variant (one of :data:`VARIANTS`); ``None`` detects it.
    """
    model_type = cfg.get("model_type")
    if model_type != "multi_modality":
        hint = ""
        if model_type == "janus":
            hint = (" This is a transformers-converted checkpoint (deepseek-community/...); use the original "
                    "deepseek-ai release instead.")
        raise CheckpointError(
            f"config.json has model_type '{model_type}', expected 'multi_modality' (an original DeepSeek "
            f"Janus / Janus-Pro / JanusFlow release).{hint}"
        )
    detected = detect_variant(cfg, folder)
    if variant is not None:
        if variant not in VARIANTS:
            raise JanusError(f"Unknown variant '{variant}'; choose one of {VARIANTS} or leave it on auto.")
        if (variant == "janusflow") != (detected == "janusflow"):
            raise JanusError(
                f"variant '{variant}' was forced but config.json describes a "
                f"{'JanusFlow' if detected == 'janusflow' else 'Janus (autoregressive)'} model; "
                "the architectures differ, so only the Janus-1.3B / Janus-Pro choice can be forced."
            )
    chosen = variant or detected
    language_config = dict(cfg.get("language_config") or {})
    if not language_config:
        raise CheckpointError("config.json has no 'language_config'; this is not a Janus checkpoint config.")
    llm = llama_spec(language_config)
    if chosen == "janusflow":
        return JanusConfig(variant=chosen, llm=llm, siglip=siglip_spec(_params(cfg, "vision_und_enc_config")),
                           flow=_flow_spec(cfg), raw=cfg)
    gen_head = _params(cfg, "gen_head_config")
    return JanusConfig(
        variant=chosen,
        llm=llm,
        siglip=siglip_spec(_params(cfg, "vision_config")),
        aligner=_mlp(_params(cfg, "aligner_config"), "aligner_config"),
        gen_aligner=_mlp(_params(cfg, "gen_aligner_config"), "gen_aligner_config"),
        gen_head=(int(gen_head["n_embed"]), int(gen_head["image_token_embed"]), int(gen_head["image_token_size"])),
        vq=_vq_spec(_params(cfg, "gen_vision_config")),
        raw=cfg,
    )


def load_config(folder: str | Path, variant: str | None = None) -> JanusConfig:
    """Read and parse ``<folder>/config.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Model folder '{folder}' does not exist or is not a directory.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"'{folder}' has no config.json; point to the folder that holds the downloaded checkpoint "
            "(config.json, tokenizer.json and the weight files)."
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download the checkpoint.") from exc
    return parse_config(cfg, variant=variant, folder=folder)
