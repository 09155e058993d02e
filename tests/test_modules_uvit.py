"""Parity tests of janus_core.modules.uvit against the janusflow-tiny goldens (original DeepSeek code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from janus_core.modules.uvit import (
    ShallowUViTDecoder,
    ShallowUViTEncoder,
    timestep_embedding,
)

FLOW_TINY = Path(__file__).parent / "fixtures" / "janusflow-tiny"
ENC_PREFIX = "vision_gen_enc_model."
DEC_PREFIX = "vision_gen_dec_model."


def _sub_dict(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _num_res_blocks(sd: dict[str, torch.Tensor]) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"mid_block\.res_blocks\.(\d+)\.", k))}
    return max(idx) + 1


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    sd = load_file(str(FLOW_TINY / "model.safetensors"))
    return {k: v.to(torch.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def flow_golden() -> dict[str, torch.Tensor]:
    return load_file(str(FLOW_TINY / "golden" / "flow.safetensors"))


@pytest.fixture(scope="module")
def encoder(weights: dict[str, torch.Tensor]) -> ShallowUViTEncoder:
    sd = _sub_dict(weights, ENC_PREFIX)
    out_ch, in_ch, k, _ = sd["in_conv.weight"].shape
    enc = ShallowUViTEncoder(
        input_channels=in_ch,
        block_out_channels=out_ch,
        hidden_size=sd["time_embed.linear_1.weight"].shape[0],
        kernel_size=k,
        stride=k,
        padding=0,
        layers_in_middle=_num_res_blocks(sd),
    )
    enc.load_state_dict(sd, strict=True)
    return enc.eval()


@pytest.fixture(scope="module")
def decoder(weights: dict[str, torch.Tensor]) -> ShallowUViTDecoder:
    sd = _sub_dict(weights, DEC_PREFIX)
    in_ch = sd["input_norm.weight"].shape[0]
    dec = ShallowUViTDecoder(
        in_channels=in_ch,
        out_channels=sd["out_convs.0.unpatch_conv.weight"].shape[0] // 4,
        hidden_size=sd["mid_block.res_blocks.0.cond_embeds_mapper.weight"].shape[1],
        upsamples=1,
        layers_in_middle=_num_res_blocks(sd),
        skip_channels=sd["out_convs.0.norm.weight"].shape[0] - in_ch,
    )
    dec.load_state_dict(sd, strict=True)
    return dec.eval()


def test_fixture_widths(encoder: ShallowUViTEncoder, decoder: ShallowUViTDecoder) -> None:
    assert encoder.block_out_channels == 32
    assert encoder.time_embed.linear_1.weight.shape == (64, 32)
    assert decoder.input_norm.weight.shape == (32,)
    assert decoder.mid_block.res_blocks[0].depthwise.weight.shape == (64, 1, 7, 7)


def test_timestep_embedding_layout() -> None:
    t = torch.tensor([0.0, 200.0, 999.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[:, :4], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 4:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize("step", range(5))
def test_encoder_t_emb_matches_golden(
    encoder: ShallowUViTEncoder, flow_golden: dict[str, torch.Tensor], step: int
) -> None:
    z = flow_golden["z_steps"][step]
    t = flow_golden["timesteps"][step]
    with torch.no_grad():
        x_emb, t_emb, hs = encoder(torch.cat([z, z]), t)
    b = 2 * z.shape[0]
    assert x_emb.shape == (b, 32, 24, 24) and x_emb.dtype == torch.float32
    assert len(hs) == 1 and hs[0] is x_emb
    expected = flow_golden["t_emb"][step]
    err = (t_emb - expected).abs().max().item()
    torch.testing.assert_close(t_emb, expected, atol=1e-5, rtol=1e-4, msg=f"step {step}: max err {err:.3e}")


def test_decoder_shapes_dtypes_and_hs_untouched(
    encoder: ShallowUViTEncoder, decoder: ShallowUViTDecoder, flow_golden: dict[str, torch.Tensor]
) -> None:
    z = flow_golden["z_steps"][1]
    t = flow_golden["timesteps"][1]
    with torch.no_grad():
        x_emb, t_emb, hs = encoder(torch.cat([z, z]), t)
        llm_out = torch.randn(x_emb.shape, generator=torch.Generator().manual_seed(0))
        hs_before = list(hs)
        v = decoder(llm_out, hs, t_emb)
    assert v.shape == (4, 4, 48, 48) and v.dtype == torch.float32
    assert torch.isfinite(v).all()
    assert len(hs) == 1 and hs[0] is hs_before[0]
    # The output depends on the skip: a different skip gives a different velocity.
    with torch.no_grad():
        v2 = decoder(llm_out, [torch.zeros_like(x_emb)], t_emb)
    assert not torch.allclose(v, v2)
    with pytest.raises(ValueError):
        decoder(llm_out, [], t_emb)


def test_bfloat16_runs_close_to_float32(
    encoder: ShallowUViTEncoder, decoder: ShallowUViTDecoder, flow_golden: dict[str, torch.Tensor]
) -> None:
    import copy

    enc16 = copy.deepcopy(encoder).to(torch.bfloat16)
    dec16 = copy.deepcopy(decoder).to(torch.bfloat16)
    z = flow_golden["z_steps"][2]
    t = flow_golden["timesteps"][2]
    zin = torch.cat([z, z])
    with torch.no_grad():
        x32, t32, hs32 = encoder(zin, t)
        llm_out = torch.randn(x32.shape, generator=torch.Generator().manual_seed(1))
        v32 = decoder(llm_out, hs32, t32)
        x16, t16, hs16 = enc16(zin.to(torch.bfloat16), t.to(torch.bfloat16))
        v16 = dec16(llm_out.to(torch.bfloat16), hs16, t16)
    assert x16.dtype == t16.dtype == v16.dtype == torch.bfloat16
    assert v16.shape == v32.shape
    assert len(hs16) == 1
    for lo, hi in ((x16, x32), (t16, t32), (v16, v32)):
        rel = (lo.float() - hi).norm() / hi.norm()
        assert rel < 0.05, f"bf16 relative error {rel:.3e}"
