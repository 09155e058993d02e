"""Parity of the SigLIP tower, aligners, gen head and VQ-16 against the janus-pro-tiny goldens."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from janus_core.modules.projector import GenHead, MlpProjector
from janus_core.modules.siglip import VisionTower
from janus_core.modules.vq import VQModel
from tests.conftest import PRO_TINY, golden

# Stored in the checkpoint but never executed (spec §2.2, §2.4); the loader drops exactly these.
DROPPED = ("vision_tower.attn_pool.", "quantize.codebook_used")


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((PRO_TINY / "config.json").read_text())


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return {k: v.float() for k, v in load_file(str(PRO_TINY / "model.safetensors")).items()}


def sub_state(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix stripped, minus the knowingly dropped tensors."""
    out = {}
    for key, value in weights.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith(DROPPED):
            continue
        out[name] = value
    return out


def load(module: nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    module.load_state_dict(sub_state(weights, prefix), strict=True)
    return module.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Absolute tolerance scaled by the magnitude of the expected tensor, plus a relative term."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module")
def vq(config: dict, weights: dict[str, torch.Tensor]) -> VQModel:
    p = config["gen_vision_config"]["params"]
    model = VQModel(
        ch=p["ch"],
        ch_mult=p["ch_mult"],
        z_channels=p["z_channels"],
        codebook_size=p["codebook_size"],
        codebook_embed_dim=p["codebook_embed_dim"],
    )
    return load(model, weights, "gen_vision_model.")


def mlp_projector(config: dict, weights: dict[str, torch.Tensor], section: str, prefix: str) -> MlpProjector:
    p = config[section]["params"]
    assert p["projector_type"] == "mlp_gelu"
    return load(MlpProjector(p["input_dim"], p["n_embed"], p["depth"]), weights, prefix)


@torch.no_grad()
def test_vq_codebook_entries_and_decode(vq: VQModel) -> None:
    g = golden(PRO_TINY, "vq_decode")
    codes = g["codes"]
    assert_close(vq.codebook_entries(codes, (24, 24)), g["zq"])
    assert_close(vq.codebook_entries(codes.int(), (24, 24)), g["zq"])
    assert_close(vq.decode_code(codes, (24, 24)), g["decoded"])


@torch.no_grad()
def test_gen_img_embeds(config: dict, weights: dict[str, torch.Tensor]) -> None:
    g = golden(PRO_TINY, "vq_decode")
    gen_embed = nn.Embedding(*weights["gen_embed.weight"].shape)
    load(gen_embed, weights, "gen_embed.")
    gen_aligner = mlp_projector(config, weights, "gen_aligner_config", "gen_aligner.")
    assert_close(gen_aligner(gen_embed(g["codes"][:, :16])), g["gen_img_embeds_first16"])


@torch.no_grad()
def test_vision_tower_and_aligner(config: dict, weights: dict[str, torch.Tensor]) -> None:
    params = config["vision_config"]["params"]
    s = params["siglip_cfg_override"]
    tower = VisionTower(
        image_size=s["image_size"],
        patch_size=s["patch_size"],
        width=s["width"],
        layers=s["layers"],
        heads=s["heads"],
        mlp_ratio=s["mlp_ratio"],
    )
    load(tower, weights, "vision_model.")
    aligner = mlp_projector(config, weights, "aligner_config", "aligner.")
    g = golden(PRO_TINY, "understanding")
    feats = tower(g["pixel_values"][:, 0])
    assert_close(feats, g["vision_features"])
    assert_close(aligner(feats), g["aligned_features"])
    assert_close(aligner(g["vision_features"]), g["aligned_features"])


@torch.no_grad()
def test_gen_head(config: dict, weights: dict[str, torch.Tensor]) -> None:
    p = config["gen_head_config"]["params"]
    head = load(GenHead(p["n_embed"], p["image_token_embed"], p["image_token_size"]), weights, "gen_head.")
    g = golden(PRO_TINY, "ar_teacher_forced")
    last_hidden = g["last_hidden"]  # [S, 4, n_embed], rows c0,u0,c1,u1
    assert_close(head(last_hidden[:, 0::2]), g["cond_logits"])
    assert_close(head(last_hidden[:, 1::2]), g["uncond_logits"])


@torch.no_grad()
def test_vq_round_trip_shapes(vq: VQModel) -> None:
    codes = golden(PRO_TINY, "vq_decode")["codes"][:1, :64]
    image = vq.decode_code(codes, (8, 8))
    assert image.shape == (1, 3, 128, 128)
    back = vq.encode_to_codes(image.clamp(-1, 1))
    assert back.shape == (1, 64)
    assert back.dtype == torch.long
    assert int(back.min()) >= 0 and int(back.max()) < vq.codebook_size


def test_no_dropped_buffers_in_modules(vq: VQModel) -> None:
    keys = set(vq.state_dict())
    assert "quantize.codebook_used" not in keys
    assert "quantize.embedding.weight" in keys
