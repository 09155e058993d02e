"""JanusFlow rectified-flow text-to-image against the reference goldens (janusflow-tiny)."""

import dataclasses
import json
import sys

import pytest
import torch

import janus_core
from janus_core.errors import JanusError
from janus_core.generate_flow import (
    SDXL_VAE_SCALING,
    FlowCFG,
    build_flow_cfg,
    generate_flow_latents,
    iter_flow_steps,
    latent_to_sdxl_vae,
    sdxl_vae_to_latent,
)
from janus_core.processor import Markup
from janus_core.sdxl_vae import decode_latents, load_sdxl_vae
from tests.conftest import FLOW_TINY, PRO_TINY, golden

STEPS = 5
CFG = 2.0


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def model():
    return janus_core.load_model(FLOW_TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def flow():
    return golden(FLOW_TINY, "flow")


@pytest.fixture(scope="module")
def prompts():
    return json.loads((FLOW_TINY / "golden" / "prompts.json").read_text(encoding="utf-8"))["prompts"]


@pytest.fixture(scope="module")
def pair(model, prompts):
    return build_flow_cfg(model, prompts[0]["prompt"], batch_size=2)


def test_cfg_rows_and_mask_match_reference(model, prompts, flow, pair):
    assert torch.equal(pair.input_ids, flow["input_ids"])
    assert torch.equal(pair.rows, flow["cfg_rows"])
    assert torch.equal(pair.attention_mask(), flow["attention_mask"])
    for entry in prompts:
        p = build_flow_cfg(model, entry["prompt"], batch_size=2)
        assert p.input_ids.tolist() == entry["input_ids"]
        assert p.rows.tolist() == entry["cfg_rows_parallel2"]
        assert p.attention_mask().tolist() == entry["attention_mask_parallel2"]
        assert p.prompt_len == len(entry["input_ids"]) - 1


def test_ode_steps_match_reference(model, flow, pair):
    b = pair.batch_size
    seen = list(iter_flow_steps(model, pair, flow["z0"], STEPS, CFG))
    assert [s.step for s in seen] == list(range(STEPS))
    for k, st in enumerate(seen):
        assert torch.equal(st.t, flow["timesteps"][k, :b])
        close(st.t_emb, flow["t_emb"][k, :b])
        close(st.t_emb, flow["t_emb"][k, b:])
        close(st.v_cond, flow["velocity_cond"][k])
        close(st.v_uncond, flow["velocity_uncond"][k])
        close(st.velocity, flow["velocity"][k])
        close(st.z, flow["z_steps"][k + 1])


def test_final_latent_and_callback(model, flow, pair):
    calls = []
    z = generate_flow_latents(model, pair, seed=0, steps=STEPS, cfg_weight=CFG, noise=flow["z0"],
                              callback=lambda step, total, zz: calls.append((step, total, zz.clone())))
    assert z.shape == (2, 4, 48, 48)
    close(z, flow["z_final"])
    assert [(s, t) for s, t, _ in calls] == [(k + 1, STEPS) for k in range(STEPS)]
    for k, (_, _, zk) in enumerate(calls):
        close(zk, flow["z_steps"][k + 1])


def test_predicted_clean_follows_the_straight_line(model, flow, pair):
    """Each step's preview target is z_before + (1 - t) * v with t the step's time; after the last step it is z."""
    before = flow["z0"]
    steps = list(iter_flow_steps(model, pair, flow["z0"], STEPS, CFG))
    for st in steps:
        t = st.step / STEPS
        assert torch.allclose(st.t.float(), torch.full_like(st.t.float(), t * 1000.0))
        torch.testing.assert_close(st.predicted_clean(), before + (1.0 - t) * st.velocity, rtol=1e-5, atol=1e-5)
        before = st.z
    assert torch.equal(steps[-1].predicted_clean(), steps[-1].z)


def test_prompt_prefix_computed_once(model, flow, pair, monkeypatch):
    fed = []
    forward = model.llm.forward

    def counting(embeds, cache, *args, **kwargs):
        fed.append(tuple(embeds.shape[:2]))
        return forward(embeds, cache, *args, **kwargs)

    monkeypatch.setattr(model.llm, "forward", counting)
    generate_flow_latents(model, pair, steps=STEPS, cfg_weight=CFG, noise=flow["z0"])
    prefix = pair.prompt_len
    # One prefill of the two distinct rows (cond, uncond), then 577 new tokens per row and step.
    assert fed == [(2, prefix)] + [(4, 1 + 576)] * STEPS

    fed.clear()
    generate_flow_latents(model, pair, steps=2, cfg_weight=1.0, noise=flow["z0"])
    assert fed == [(1, prefix)] + [(2, 1 + 576)] * 2


def test_cfg_one_is_the_conditional_velocity(model, flow, pair):
    first = next(iter_flow_steps(model, pair, flow["z0"], STEPS, 1.0))
    assert first.v_uncond is None
    close(first.velocity, flow["velocity_cond"][0])
    close(first.z, flow["z0"] + flow["velocity_cond"][0] / STEPS)


def test_seeds_reproducible_and_per_image(model):
    kwargs = dict(steps=2, cfg_weight=CFG)
    a = generate_flow_latents(model, "a green hill", batch_size=3, seed=11, **kwargs)
    b = generate_flow_latents(model, "a green hill", batch_size=3, seed=11, **kwargs)
    assert torch.equal(a, b)
    for i in range(3):
        alone = generate_flow_latents(model, "a green hill", batch_size=1, seed=11 + i, **kwargs)
        torch.testing.assert_close(alone[0], a[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    other = generate_flow_latents(model, "a green hill", batch_size=1, seed=12, **kwargs)
    assert not torch.allclose(other[0], a[0])


def test_negative_prompt_rows(model, pair):
    short = build_flow_cfg(model, "A red cube on a blue table.", batch_size=2, negative_prompt="blur")
    neg_ids = model.tokenizer.encode(["User: blur\n\nAssistant:", Markup("<begin_of_image>")])
    length = short.rows.shape[1]
    assert length == len(short.input_ids) > len(neg_ids)
    assert short.rows[:2].tolist() == [short.input_ids.tolist()] * 2
    pad = length - len(neg_ids)
    for row, ok in zip(short.rows[2:], short.valid[2:], strict=True):
        assert row[pad:].tolist() == neg_ids
        assert (row[:pad] == model.tokenizer.pad_id).all()
        assert not ok[:pad].any() and ok[pad:].all()
    assert short.valid[:2].all()
    assert short.negative_prompt == "blur"

    long_neg = "blurry, low quality, deformed, ugly, extra limbs, watermark, text, jpeg artifacts"
    long = build_flow_cfg(model, "a cat", batch_size=1, negative_prompt=long_neg)
    cond_len = len(long.input_ids)
    assert long.rows.shape[1] > cond_len
    assert long.rows[0, -cond_len:].tolist() == long.input_ids.tolist()
    assert long.valid[0].sum() == cond_len - 1 and long.valid[1].all()

    empty = build_flow_cfg(model, "A red cube on a blue table.", batch_size=2, negative_prompt="  ")
    assert empty.negative_prompt is None and torch.equal(empty.rows, pair.rows)


def test_negative_prompt_changes_the_result(model, flow, pair):
    neg = build_flow_cfg(model, pair.prompt, batch_size=2, negative_prompt="a dark and blurry photo")
    with_neg = generate_flow_latents(model, neg, steps=2, noise=flow["z0"])
    default = generate_flow_latents(model, pair, steps=2, noise=flow["z0"])
    assert torch.isfinite(with_neg).all()
    assert (with_neg - default).abs().max() > 1e-3
    # The negative prompt only moves the unconditional branch.
    a = next(iter_flow_steps(model, neg, flow["z0"], 2, CFG))
    b = next(iter_flow_steps(model, pair, flow["z0"], 2, CFG))
    close(a.v_cond, b.v_cond)
    assert (a.v_uncond - b.v_uncond).abs().max() > 1e-3


def test_callback_exception_stops_the_loop(model, pair, flow):
    calls = []

    def cancel(step, total, z):
        calls.append(step)
        if step == 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        generate_flow_latents(model, pair, steps=STEPS, noise=flow["z0"], callback=cancel)
    assert calls == [1, 2]


def test_bad_inputs(model, pair, flow):
    with pytest.raises(JanusError, match="steps"):
        generate_flow_latents(model, pair, steps=0)
    with pytest.raises(JanusError, match="batch_size"):
        build_flow_cfg(model, "a cat", batch_size=0)
    with pytest.raises(JanusError, match="batch_size"):
        generate_flow_latents(model, "a cat", batch_size=0)
    with pytest.raises(JanusError, match="noise"):
        generate_flow_latents(model, pair, steps=1, noise=flow["z0"][:1])
    with pytest.raises(JanusError, match="noise"):
        generate_flow_latents(model, pair, steps=1, noise=torch.zeros(2, 4, 32, 32))
    with pytest.raises(JanusError, match="cfg_weight"):
        generate_flow_latents(model, pair, steps=1, cfg_weight=-1.0)
    with pytest.raises(JanusError, match="cfg_weight"):
        generate_flow_latents(model, pair, steps=1, cfg_weight=float("nan"))
    with pytest.raises(JanusError, match="another model"):
        generate_flow_latents(model, dataclasses.replace(pair, model_folder="/elsewhere"), steps=1)
    with pytest.raises(JanusError, match="batch size"):
        generate_flow_latents(model, pair, batch_size=3, steps=1)
    with pytest.raises(JanusError, match="negative prompt"):
        generate_flow_latents(model, pair, negative_prompt="blur", steps=1)
    with pytest.raises(JanusError, match="empty"):
        build_flow_cfg(model, "   ")
    limit = model.config.llm.max_position_embeddings
    with pytest.raises(JanusError, match="Shorten"):
        build_flow_cfg(model, " a" * limit)


def test_rejects_autoregressive_models_and_pairs(model):
    from janus_core.generate_ar import build_cfg_pair

    pro = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    with pytest.raises(JanusError, match="JanusFlow"):
        build_flow_cfg(pro, "a cat")
    with pytest.raises(JanusError, match="JanusFlow"):
        generate_flow_latents(pro, "a cat", steps=1)
    with pytest.raises(JanusError, match="FlowCFG"):
        generate_flow_latents(model, build_cfg_pair(pro, "a cat"), steps=1)
    assert not isinstance(build_cfg_pair(pro, "a cat"), FlowCFG)


def test_latent_scaling_matches_reference(flow):
    assert SDXL_VAE_SCALING == 0.13025
    torch.testing.assert_close(latent_to_sdxl_vae(flow["z_final"]), flow["vae_input"], rtol=1e-6, atol=0)
    torch.testing.assert_close(sdxl_vae_to_latent(flow["vae_input"]), flow["z_final"], rtol=1e-6, atol=1e-7)


def test_vae_loader_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(JanusError, match="pip install diffusers"):
        load_sdxl_vae(FLOW_TINY / "vae")


def test_vae_round_trip_to_reference_image(flow):
    pytest.importorskip("diffusers", reason="diffusers is optional (pip install diffusers) and not installed")
    vae = load_sdxl_vae(FLOW_TINY / "vae", device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        raw = vae.decode(flow["vae_input"]).sample
    torch.testing.assert_close(raw, flow["decoded"], rtol=0, atol=1e-4)
    images = decode_latents(vae, flow["z_final"])
    assert images.shape == (2, 384, 384, 3) and images.dtype == torch.float32
    expected = ((flow["decoded"].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)
    as_uint8 = (images * 255).to(torch.uint8)
    assert (as_uint8.int() - flow["images"].int()).abs().max() <= 1
    with pytest.raises(JanusError, match="single file"):
        load_sdxl_vae(FLOW_TINY / "vae" / "config.json")
    with pytest.raises(JanusError, match="shape"):
        decode_latents(vae, flow["z_final"][0])
