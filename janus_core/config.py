"""Parse and check the ``config.json`` of every Janus variant into one typed description.

Variants (the strings used everywhere in this package):

* ``"janus-1.3b"``: Janus-1.3B, autoregressive VQ generation, roles ``User``/``Assistant``.
* ``"janus-pro"``: Janus-Pro-1B and -7B, same architecture, roles ``<|User|>``/``<|Assistant|>``.
* ``"janusflow"``: JanusFlow-1.3B, rectified-flow generation in SDXL-VAE latent space.

Detection rule (overridable by passing ``variant=``): a config with ``vision_gen_enc_config`` is
JanusFlow. Otherwise the checkpoint's own tokenizer files decide: ``special_tokens_map.json`` listing
``<|User|>`` as an additional special token means Janus-Pro (all Pro releases do), listing none means
Janus-1.3B. Without that file, a ``tokenizer.json`` lacking ``<|User|>`` means Janus-1.3B; one that has it
could be either (the Janus-1.3B-family tokenizers carry the token too), so loading stops and asks for the
variant instead of guessing.

Every size is checked before anything is built: it must be an integer (not a boolean) within the
plausibility bounds below, which are generous (Janus-Pro-7B uses a fraction of each) but keep a corrupt or
hostile config from making the loader build or allocate absurd sizes; sizes that must agree with each other
(heads and hidden size, aligner and LLM widths, ...) are checked too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, JanusError
from .jsonfile import JsonFields, kind, read_json, show

logger = logging.getLogger(__name__)

VARIANTS = ("janus-1.3b", "janus-pro", "janusflow")
AR_VARIANTS = ("janus-1.3b", "janus-pro")
PRO_ROLE_TOKEN = "<|User|>"

# Plausibility bounds (inclusive); the largest release value is in brackets.
MAX_LLM_HIDDEN = 65536  # language_config.hidden_size [4096, Janus-Pro-7B]
MAX_LLM_INTERMEDIATE = 262144  # intermediate_size [11008]
MAX_LLM_LAYERS = 512  # num_hidden_layers [30]
MAX_HEADS = 1024  # attention heads of the LLM and the vision tower [32]
MAX_VOCAB = 1 << 20  # vocab_size [102400]
MAX_POSITIONS = 1 << 20  # max_position_embeddings [16384]
MIN_POSITIONS = 1024  # the 576 image positions (577 for JanusFlow) plus a prompt; editing needs ~1.8k
MAX_ROPE_THETA = 1e12  # rope_theta [10000]
MAX_WIDTH = 65536  # aligner / gen-head widths [4096]
MAX_PROJECTOR_DEPTH = 16  # aligner depth [2]
MAX_IMAGE_SIZE = 4096  # vision tower input side in pixels [384]
MAX_VIT_WIDTH = 16384  # vision tower width, JanusFlow U-ViT channels [1024]
MAX_VIT_LAYERS = 256  # vision tower blocks [24]
MAX_MLP_RATIO = 16.0  # vision tower MLP ratio [4]
MAX_VQ_CHANNELS = 4096  # VQ ch, z_channels, codebook_embed_dim [256]
MAX_VQ_LEVELS = 8  # len(ch_mult), len(block_out_channels) [5]
MAX_VQ_CH_MULT = 64  # each ch_mult entry [4]
MAX_CODEBOOK = 1 << 20  # codebook_size, image_token_size [16384]
MAX_LATENT_CHANNELS = 64  # JanusFlow latent channels [4]
MAX_FLOW_BLOCKS = 64  # JanusFlow layers_in_middle [2]
MAX_FLOW_KERNEL = 64  # JanusFlow patchify kernel, stride, padding [2]
MAX_FLOW_UPSAMPLES = 8  # JanusFlow decoder upsamples [1]
FLOW_LATENT_SIZE = 48  # JanusFlow's SDXL-VAE latent side (384 px / 8)
FLOW_GRID = 24  # its U-ViT token grid side: the 576 image positions of the prompt

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def parameter_count(self) -> int:
        """Values in the language model's state dict: embeddings, layers, final norm and output head."""
        h = self.hidden_size
        attention = h * self.head_dim * 2 * (self.num_attention_heads + self.num_key_value_heads)
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        return 2 * self.vocab_size * h + self.num_hidden_layers * layer + h


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
        """Understanding features per image (SigLIP patches: 576 for the releases)."""
        return self.siglip.num_patches

    @property
    def image_token_grid(self) -> tuple[int, int]:
        """``(rows, columns)`` of the VQ tokens of a generated or encoded image (AR variants): the image size
        over the VQ downsampling factor, 384 / 16 = 24 x 24 for the releases."""
        if self.vq is None:
            raise JanusError("internal: JanusFlow has no VQ token grid")
        side = self.siglip.image_size // 2 ** (len(self.vq.ch_mult) - 1)
        return side, side


def _params(cfg: JsonFields, key: str) -> JsonFields:
    """``cfg[key]["params"]`` (a missing ``params`` is empty)."""
    if not cfg.has(key):
        raise CheckpointError(f"{cfg.file} has no '{key}' section; this is not a Janus checkpoint config. "
                              f"{JsonFields.fix_for(cfg.file)}")
    return cfg.sub(key).sub("params", {})


def llama_spec(language_config: dict, file: str = "config.json") -> LlamaSpec:
    """Apply LlamaConfig defaults to a (possibly partial) ``language_config`` and check every size."""
    f, d = JsonFields(file, "language_config", language_config), LLAMA_DEFAULTS
    hidden = f.integer("hidden_size", 1, MAX_LLM_HIDDEN, d["hidden_size"])
    heads = f.integer("num_attention_heads", 1, MAX_HEADS, d["num_attention_heads"])
    kv_heads = f.integer("num_key_value_heads", 1, heads, heads)
    if hidden % heads or (hidden // heads) % 2:
        raise f.fail("num_attention_heads", f"= {heads} does not divide hidden_size {hidden} into heads of an "
                     "even size (rotary embeddings need one)")
    if heads % kv_heads:
        raise f.fail("num_key_value_heads", f"= {kv_heads} does not divide num_attention_heads {heads}")
    hidden_act = f.text("hidden_act", d["hidden_act"])
    if hidden_act != "silu":
        raise f.fail("hidden_act", f"is '{hidden_act}'; Janus language models use 'silu'")
    _refuse_unsupported_llama_options(f, hidden // heads)
    return LlamaSpec(
        vocab_size=f.integer("vocab_size", 1, MAX_VOCAB, d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size", 1, MAX_LLM_INTERMEDIATE, d["intermediate_size"]),
        num_hidden_layers=f.integer("num_hidden_layers", 1, MAX_LLM_LAYERS, d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=f.integer("max_position_embeddings", MIN_POSITIONS, MAX_POSITIONS,
                                          d["max_position_embeddings"]),
        rms_norm_eps=f.number("rms_norm_eps", 0.0, 1.0, d["rms_norm_eps"]),
        rope_theta=f.number("rope_theta", 0.0, MAX_ROPE_THETA, d["rope_theta"]),
        hidden_act=hidden_act,
    )


def _refuse_unsupported_llama_options(f: JsonFields, head_dim: int) -> None:
    """Refuse LlamaConfig options no Janus release sets and this package does not implement (they would be
    ignored, computing another network than the config describes)."""
    off = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
    for key, value in off.items():
        if f.flag(key, value) != value:
            raise f.fail(key, f"is {str(not value).lower()}, which no Janus release uses and this package does not "
                         "support")
    if f.has("rope_scaling"):
        raise f.fail("rope_scaling", "is set, which no Janus release uses and this package does not support")
    if f.has("head_dim") and f.integer("head_dim", 1, MAX_WIDTH) != head_dim:
        raise f.fail("head_dim", f"differs from hidden_size / num_attention_heads ({head_dim}), which this package "
                     "does not support")


def siglip_spec(params: dict, file: str = "config.json", section: str = "vision_config.params") -> SiglipSpec:
    """SigLIP sizes from a ``vision_config.params`` dict (``siglip_cfg_override`` wins over the name)."""
    p = JsonFields(file, section, params)
    name = p.text("model_name", "siglip_large_patch16_384")
    if p.has("siglip_cfg_override"):
        base = p.sub("siglip_cfg_override")
    elif name in SIGLIP_MODELS:
        base = JsonFields(file, f"{section} (tower '{name}')", SIGLIP_MODELS[name])
    else:
        raise CheckpointError(
            f"{file}: unknown vision tower '{name}' in {section}.model_name; supported: {sorted(SIGLIP_MODELS)}."
        )
    full_layers = base.integer("layers", 1, MAX_VIT_LAYERS)
    select_layer = p.integer("select_layer", -full_layers, MAX_VIT_LAYERS, default=-1)
    if select_layer < 0:
        layers = full_layers + select_layer + 1
    else:
        layers = min(full_layers, select_layer) if select_layer > 0 else full_layers
    image_size = (p if p.has("image_size") else base).integer("image_size", 1, MAX_IMAGE_SIZE)
    patch_size = base.integer("patch_size", 1, image_size)
    if image_size % patch_size:
        raise p.fail("image_size", f"= {image_size} is not a multiple of the patch size {patch_size}")
    width = base.integer("width", 1, MAX_VIT_WIDTH)
    heads = base.integer("heads", 1, MAX_HEADS)
    if width % heads:
        raise base.fail("heads", f"= {heads} does not divide the width {width}")
    return SiglipSpec(image_size, patch_size, width, layers, heads, base.number("mlp_ratio", 0.0, MAX_MLP_RATIO))


def _mlp(params: JsonFields) -> tuple[int, int, int]:
    projector = params.text("projector_type", "mlp_gelu")
    if projector != "mlp_gelu":
        raise params.fail("projector_type", f"is '{projector}'; only 'mlp_gelu' is supported")
    return (params.integer("input_dim", 1, MAX_WIDTH), params.integer("n_embed", 1, MAX_WIDTH),
            params.integer("depth", 1, MAX_PROJECTOR_DEPTH, default=2))


def _vq_spec(params: JsonFields) -> VQSpec:
    d = VQ16_DEFAULTS
    return VQSpec(
        ch=params.integer("ch", 1, MAX_VQ_CHANNELS, d["ch"]),
        ch_mult=params.integers("ch_mult", 1, MAX_VQ_CH_MULT, MAX_VQ_LEVELS, d["ch_mult"]),
        z_channels=params.integer("z_channels", 1, MAX_VQ_CHANNELS, d["z_channels"]),
        codebook_size=params.integer("codebook_size", 1, MAX_CODEBOOK, d["codebook_size"]),
        codebook_embed_dim=params.integer("codebook_embed_dim", 1, MAX_VQ_CHANNELS, d["codebook_embed_dim"]),
    )


def _flow_spec(cfg: JsonFields) -> FlowSpec:
    enc = _params(cfg, "vision_gen_enc_config")
    dec = _params(cfg, "vision_gen_dec_config")
    spec = FlowSpec(
        enc_channels=enc.integers("block_out_channels", 1, MAX_VIT_WIDTH, MAX_VQ_LEVELS, [768])[-1],
        dec_channels=dec.integer("in_channels", 1, MAX_VIT_WIDTH, 768),
        latent_channels=enc.integer("input_channels", 1, MAX_LATENT_CHANNELS, 4),
        dec_out_channels=dec.integer("out_channels", 1, MAX_LATENT_CHANNELS, 4),
        layers_in_middle_enc=enc.integer("layers_in_middle", 0, MAX_FLOW_BLOCKS, 2),
        layers_in_middle_dec=dec.integer("layers_in_middle", 0, MAX_FLOW_BLOCKS, 2),
        kernel_size=enc.integer("kernel_size", 1, MAX_FLOW_KERNEL, 2),
        stride=enc.integer("stride", 1, MAX_FLOW_KERNEL, 2),
        padding=enc.integer("padding", 0, MAX_FLOW_KERNEL, 0),
        upsamples=dec.integer("upsamples", 1, MAX_FLOW_UPSAMPLES, 1),
        norm_eps=enc.number("norm_eps", 0.0, 1.0, 1e-6),
    )
    side = (FLOW_LATENT_SIZE + 2 * spec.padding - spec.kernel_size) // spec.stride + 1
    if side != FLOW_GRID:
        raise enc.fail("kernel_size", f"= {spec.kernel_size} with stride {spec.stride} and padding {spec.padding} "
                       f"turns the {FLOW_LATENT_SIZE}x{FLOW_LATENT_SIZE} latent into {side}x{side} tokens, not the "
                       f"{FLOW_GRID}x{FLOW_GRID} JanusFlow's prompt has positions for")
    if FLOW_GRID * 2 ** spec.upsamples != FLOW_LATENT_SIZE:
        raise dec.fail("upsamples", f"= {spec.upsamples} does not turn the {FLOW_GRID}x{FLOW_GRID} tokens back into "
                       f"the {FLOW_LATENT_SIZE}x{FLOW_LATENT_SIZE} latent")
    return spec


def _require_equal(section: JsonFields, key: str, value: int, other: int, what: str) -> None:
    if value != other:
        raise section.fail(key, f"= {value} does not match {what} ({other})")


def _ar_parts(cfg: JsonFields, llm: LlamaSpec, siglip: SiglipSpec) -> dict[str, Any]:
    """Aligners, image-token head and VQ of an autoregressive config, checked against each other."""
    aligner_params, gen_aligner_params = _params(cfg, "aligner_config"), _params(cfg, "gen_aligner_config")
    head = _params(cfg, "gen_head_config")
    aligner, gen_aligner = _mlp(aligner_params), _mlp(gen_aligner_params)
    vq = _vq_spec(_params(cfg, "gen_vision_config"))
    gen_head = (head.integer("n_embed", 1, MAX_WIDTH), head.integer("image_token_embed", 1, MAX_WIDTH),
                head.integer("image_token_size", 1, MAX_CODEBOOK))
    _require_equal(aligner_params, "input_dim", aligner[0], siglip.width, "the vision tower's width")
    _require_equal(aligner_params, "n_embed", aligner[1], llm.hidden_size, "language_config.hidden_size")
    _require_equal(gen_aligner_params, "input_dim", gen_aligner[0], vq.codebook_embed_dim,
                   "gen_vision_config's codebook_embed_dim")
    _require_equal(gen_aligner_params, "n_embed", gen_aligner[1], llm.hidden_size, "language_config.hidden_size")
    _require_equal(head, "n_embed", gen_head[0], llm.hidden_size, "language_config.hidden_size")
    _require_equal(head, "image_token_size", gen_head[2], vq.codebook_size, "gen_vision_config's codebook_size")
    return {"aligner": aligner, "gen_aligner": gen_aligner, "gen_head": gen_head, "vq": vq}


def _declares_pro_roles(folder: Path) -> bool | None:
    """Whether the checkpoint's tokenizer files declare the Janus-Pro role token; ``None`` when they cannot tell.

    ``special_tokens_map.json`` decides when present (Janus-Pro lists ``<|User|>`` among its additional
    special tokens, Janus-1.3B lists none). Without it, a ``tokenizer.json`` that lacks ``<|User|>`` among its
    added tokens cannot be a Janus-Pro tokenizer; one that has it could be either (Janus-1.3B-family
    tokenizers carry the token too).
    """
    stm_path = folder / "special_tokens_map.json"
    if stm_path.is_file():
        stm = JsonFields(str(stm_path), "", read_json(stm_path))
        extra = stm.get("additional_special_tokens", [])
        if not isinstance(extra, list):
            raise stm.fail("additional_special_tokens", f"must be a list, found {kind(extra)}")
        return PRO_ROLE_TOKEN in {_token_content(stm, "additional_special_tokens", t) for t in extra}
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        return None
    tok = JsonFields(str(tok_path), "", read_json(tok_path))
    added = tok.get("added_tokens", [])
    if not isinstance(added, list):
        raise tok.fail("added_tokens", f"must be a list, found {kind(added)}")
    if PRO_ROLE_TOKEN in {_token_content(tok, "added_tokens", t) for t in added}:
        return None
    return False


def _token_content(section: JsonFields, key: str, token: object) -> str:
    """A special token's text: the string itself or the ``content`` of a token object."""
    content = token.get("content") if isinstance(token, dict) else token
    if not isinstance(content, str):
        raise section.fail(key, f"holds {show(token)}, which is neither a string nor a token with a 'content'")
    return content


def detect_variant(cfg: dict, folder: Path | None = None) -> str:
    """Variant from the config and the folder's tokenizer files; see the module docstring.

    Raises :class:`CheckpointError` when the files cannot tell Janus-1.3B from Janus-Pro (pass ``variant=``).
    """
    if "vision_gen_enc_config" in cfg:
        return "janusflow"
    pro = _declares_pro_roles(folder) if folder is not None else None
    if pro is not None:
        return "janus-pro" if pro else "janus-1.3b"
    if folder is None:
        where = "A config.json alone cannot tell"
    elif not (folder / "tokenizer.json").is_file():
        where = f"{folder} has neither special_tokens_map.json nor tokenizer.json to tell"
    else:
        where = (f"{folder} has no special_tokens_map.json, and its tokenizer.json declares {PRO_ROLE_TOKEN} "
                 "(Janus-1.3B-family tokenizers do too), which does not tell")
    raise CheckpointError(
        f"{where} Janus-Pro from Janus-1.3B (they need different prompt roles). Copy "
        "special_tokens_map.json from the release into the folder, or choose the variant: pick it in the Janus "
        "Model Loader node, pass --variant janus-pro (Janus-Pro-1B/7B) or --variant janus-1.3b on the command "
        "line, or variant='janus-pro' / 'janus-1.3b' to load_model."
    )


def parse_config(cfg: dict, variant: str | None = None, folder: Path | None = None,
                 file: str = "config.json") -> JanusConfig:
    """Build a :class:`JanusConfig` from a parsed ``config.json`` (named ``file`` in messages).

    ``variant`` forces the variant (one of :data:`VARIANTS`); ``None`` detects it from ``folder``'s tokenizer
    files. Every size is checked against the plausibility bounds above and against the sizes it must match.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file} holds {kind(cfg)}, not a JSON object. {JsonFields.fix_for(file)}")
    model_type = cfg.get("model_type")
    if model_type != "multi_modality":
        hint = ""
        if model_type == "janus":
            hint = (" This is a transformers-converted checkpoint (deepseek-community/...); use the original "
                    "deepseek-ai release instead.")
        raise CheckpointError(
            f"{file} has model_type {show(model_type)}, expected 'multi_modality' (an original DeepSeek "
            f"Janus / Janus-Pro / JanusFlow release).{hint}"
        )
    is_flow = "vision_gen_enc_config" in cfg
    if variant is not None:
        if variant not in VARIANTS:
            raise JanusError(f"Unknown variant '{variant}'; choose one of {VARIANTS} or leave it on auto.")
        if (variant == "janusflow") != is_flow:
            raise JanusError(
                f"variant '{variant}' was forced but {file} describes a "
                f"{'JanusFlow' if is_flow else 'Janus (autoregressive)'} model; "
                "the architectures differ, so only the Janus-1.3B / Janus-Pro choice can be forced."
            )
    section = JsonFields(file, "", cfg)
    if not cfg.get("language_config"):
        raise CheckpointError(f"{file} has no 'language_config'; this is not a Janus checkpoint config. "
                              f"{JsonFields.fix_for(file)}")
    llm = llama_spec(cfg["language_config"], file)
    if is_flow:
        parts: dict[str, Any] = {"flow": _flow_spec(section), "siglip": siglip_spec(
            _params(section, "vision_und_enc_config").values, file, "vision_und_enc_config.params")}
    else:
        siglip = siglip_spec(_params(section, "vision_config").values, file)
        parts = {"siglip": siglip, **_ar_parts(section, llm, siglip)}
    return JanusConfig(variant=variant or detect_variant(cfg, folder), llm=llm, raw=cfg, **parts)


def load_config(folder: str | Path, variant: str | None = None) -> JanusConfig:
    """Read, check and parse ``<folder>/config.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Model folder '{folder}' does not exist or is not a directory.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"'{folder}' has no config.json; point to the folder that holds the downloaded checkpoint "
            "(config.json, tokenizer.json and the weight files)."
        )
    return parse_config(read_json(path, expect=object), variant=variant, folder=folder, file=str(path))
