"""JanusFlow img2img and inpainting (init_latent, denoise, noise_mask) on janusflow-tiny: the schedule rule, its
limits (denoise 1 = text-to-image bit for bit and the reference golden, denoise -> 0 = the input), masks,
per-image seeds, the errors for bad inputs, and the JanusFlow ODE Sampler node with a LATENT input."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import janus_core
from janus_core.errors import JanusError
from janus_core.generate_flow import (
    build_flow_cfg,
    flow_bytes,
    flow_times,
    generate_flow_latents,
    initial_noise,
    iter_flow_steps,
    latent_to_sdxl_vae,
    sdxl_vae_to_latent,
)
from janus_core.sdxl_vae import decode_latents, encode_images, load_sdxl_vae
from nodes import comfy_services
from nodes.flow import DSJanusFlowSampler
from nodes.text_to_image import DSJanusCFGPair, DSJanusPromptEncoder
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY, golden, node_model

STEPS = 5
CFG = 2.0


@pytest.fixture(scope="module")
def model():
    return janus_core.load_model(FLOW_TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pair(model):
    return build_flow_cfg(model, "A red cube on a blue table.", batch_size=2)


@pytest.fixture(scope="module")
def latent():
    """A stand-in input latent [2, 4, 48, 48] in model space (smooth, unlike noise)."""
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(2, 4, 6, 6, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bilinear")


def half_mask(batch: int = 2, side: int = 48) -> torch.Tensor:
    """[batch, 1, side, side]: regenerate the left half, keep the right half."""
    mask = torch.zeros(batch, 1, side, side)
    mask[..., : side // 2] = 1.0
    return mask


def test_schedule_times():
    assert flow_times(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert flow_times(3, 0.6) == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert flow_times(30)[:-1] == [k / 30 for k in range(30)]  # the reference's times, to the bit
    assert flow_times(7, 0.3)[-1] == 1.0


def test_denoise_one_is_text_to_image_bit_for_bit_and_matches_the_golden(model, pair, latent):
    ref = golden(FLOW_TINY, "flow")
    plain = list(iter_flow_steps(model, pair, ref["z0"], STEPS, CFG))
    seeded = list(iter_flow_steps(model, pair, ref["z0"], STEPS, CFG, init_latent=latent, denoise=1.0))
    assert len(seeded) == STEPS
    for a, b in zip(plain, seeded, strict=True):
        assert torch.equal(a.t, b.t) and torch.equal(a.z, b.z) and torch.equal(a.velocity, b.velocity)
        assert torch.equal(a.predicted_clean(), b.predicted_clean())
    expected = ref["z_final"]
    torch.testing.assert_close(seeded[-1].z, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    for k, st in enumerate(seeded):
        assert torch.equal(st.t, ref["timesteps"][k, :2])
    # a mask of ones regenerates everything: still the same run
    ones = list(iter_flow_steps(model, pair, ref["z0"], STEPS, CFG, init_latent=latent, noise_mask=torch.ones(48, 48)))
    assert torch.equal(ones[-1].z, plain[-1].z)
    # through generate_flow_latents with its seeded noise, too
    z = generate_flow_latents(model, pair, seed=4, steps=2, cfg_weight=CFG)
    assert torch.equal(generate_flow_latents(model, pair, seed=4, steps=2, cfg_weight=CFG, init_latent=latent[:1],
                                             denoise=1.0), z)


@pytest.mark.parametrize("mask", [None, "half"])
def test_denoise_near_zero_returns_the_input(model, pair, latent, mask):
    noise_mask = half_mask() if mask else None
    z = generate_flow_latents(model, pair, seed=1, steps=3, cfg_weight=CFG, init_latent=latent, denoise=1e-6,
                              noise_mask=noise_mask)
    torch.testing.assert_close(z, latent, rtol=0, atol=1e-4)
    far = generate_flow_latents(model, pair, seed=1, steps=3, cfg_weight=CFG, init_latent=latent, denoise=0.5)
    assert (far - latent).abs().max() > 1e-2  # a real change once denoise is not tiny


def test_partial_denoise_continues_the_full_run(model, pair, latent):
    """denoise 0.5 with 3 steps = the last 3 steps of a 6-step run whose z at t = 0.5 is the re-noised input."""
    noise = initial_noise(model, 2, 8)
    full = list(iter_flow_steps(model, pair, noise, 6, CFG))
    # choose the input so that 0.5 * x + 0.5 * noise is the full run's z at t = 0.5
    x = 2.0 * full[2].z - noise
    part = list(iter_flow_steps(model, pair, noise, 3, CFG, init_latent=x, denoise=0.5))
    assert [st.step for st in part] == [0, 1, 2] and all(st.steps == 3 for st in part)
    assert [st.t_next for st in part] == pytest.approx([4 / 6, 5 / 6, 1.0])
    for a, b in zip(part, full[3:], strict=True):
        torch.testing.assert_close(a.t, b.t)
        torch.testing.assert_close(a.z, b.z, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.predicted_clean(), b.predicted_clean(), rtol=1e-4, atol=1e-4)
    # the start: the input re-noised to t0 = 1 - denoise on the straight line, then z += v * denoise / steps
    first = next(iter_flow_steps(model, pair, noise, 4, CFG, init_latent=latent, denoise=0.6))
    assert torch.allclose(first.t, torch.full((2,), 400.0))
    start = 0.4 * latent + 0.6 * noise
    torch.testing.assert_close(first.z, start + first.velocity * (0.6 / 4), rtol=1e-5, atol=1e-5)


def test_noise_mask_keeps_the_rest_on_the_input(model, pair, latent):
    noise = initial_noise(model, 2, 2)
    mask = half_mask()
    run = list(iter_flow_steps(model, pair, noise, 3, CFG, init_latent=latent, denoise=0.8, noise_mask=mask))
    keep = (slice(None), slice(None), slice(None), slice(24, None))
    edit = (slice(None), slice(None), slice(None), slice(None, 24))
    for st in run:
        t = st.t_next
        torch.testing.assert_close(st.z[keep], (t * latent + (1 - t) * noise)[keep], rtol=1e-6, atol=1e-6)
        assert torch.equal(st.predicted_clean()[keep], latent[keep])  # the preview shows the kept input
    assert torch.equal(run[-1].z[keep], latent[keep])  # exactly the input at the end
    unmasked = list(iter_flow_steps(model, pair, noise, 3, CFG, init_latent=latent, denoise=0.8))
    # the first step's regenerated half moves like an unmasked run (same start, same model call) ...
    torch.testing.assert_close(run[0].z[edit], unmasked[0].z[edit])
    # ... and ends away from the input
    assert (run[-1].z[edit] - latent[edit]).abs().max() > 1e-2


def test_mask_layouts_and_resolutions_agree(model, pair, latent):
    """[H, W], [1, H, W], [B, 1, H, W]; bool or float; latent or pixel resolution (resized bilinearly to 48x48
    as ComfyUI does: an 8x8-block pixel mask becomes the latent mask exactly)."""
    noise = initial_noise(model, 2, 6)

    def final(mask):
        return list(iter_flow_steps(model, pair, noise, 2, CFG, init_latent=latent, denoise=0.7,
                                    noise_mask=mask))[-1].z

    expected = final(half_mask())
    pixel = half_mask(1, 384)[0, 0]
    for mask in (half_mask(1)[0, 0], half_mask(1)[0], half_mask(1), half_mask(2).bool(), pixel, pixel[None],
                 half_mask(2, 384)):
        assert torch.equal(final(mask), expected)
    soft = torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    z = final(soft)
    assert z.shape == (2, 4, 48, 48) and torch.isfinite(z).all()


def test_image_i_of_a_batch_is_a_batch_of_one_with_seed_plus_i(model, latent):
    three = torch.cat([latent, latent[:1].flip(-1)])
    mask = torch.cat([half_mask(2), half_mask(1).flip(-2)])
    kwargs = dict(steps=2, cfg_weight=CFG, denoise=0.7)
    batch = generate_flow_latents(model, "a green hill", batch_size=3, seed=11, init_latent=three, noise_mask=mask,
                                  **kwargs)
    shared = generate_flow_latents(model, "a green hill", batch_size=3, seed=11, init_latent=three[:1], **kwargs)
    for i in range(3):
        alone = generate_flow_latents(model, "a green hill", seed=11 + i, init_latent=three[i:i + 1],
                                      noise_mask=mask[i:i + 1], **kwargs)
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-5, atol=1e-5)
        alone = generate_flow_latents(model, "a green hill", seed=11 + i, init_latent=three[:1], **kwargs)
        torch.testing.assert_close(alone[0], shared[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shared[0], shared[1])  # one input latent, different noise per image


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(denoise=0.0), r"denoise must be in \(0, 1\]"),
    (dict(denoise=-0.5), r"denoise must be in \(0, 1\]"),
    (dict(denoise=1.01), r"denoise must be in \(0, 1\]"),
    (dict(denoise=float("nan")), "denoise must be a finite number"),
    (dict(denoise=float("inf")), "denoise must be a finite number"),
    (dict(denoise="0.5"), "denoise must be a number"),
    (dict(init_latent=None, denoise=0.5), "denoise < 1 needs an input latent"),
    (dict(init_latent=None, noise_mask=torch.ones(48, 48)), "noise_mask needs an input latent"),
    (dict(init_latent=torch.zeros(1, 4, 64, 64)), "64x64 .*512x512 image.*encode a 384x384 image"),
    (dict(init_latent=torch.zeros(1, 4, 48, 32)), "encode a 384x384 image"),
    (dict(init_latent=torch.zeros(1, 16, 48, 48)), "16 channels.*SDXL VAE"),
    (dict(init_latent=torch.zeros(3, 4, 48, 48)), "batch of 3, the generation 2"),
    (dict(init_latent=torch.zeros(4, 48, 48)), r"float tensor \[2 or 1, 4, 48, 48\]"),
    (dict(init_latent=torch.zeros(1, 4, 48, 48, dtype=torch.long)), "float tensor"),
    (dict(init_latent=[[0.0]]), "float tensor"),
    (dict(init_latent=torch.full((1, 4, 48, 48), float("nan"))), "NaN"),
    (dict(noise_mask=torch.ones(1, 2, 48, 48)), r"noise_mask must be .*got shape \[1, 2, 48, 48\]"),
    (dict(noise_mask=torch.ones(1, 1, 1, 48, 48)), "got shape"),
    (dict(noise_mask=torch.ones(48)), "got shape"),
    (dict(noise_mask=torch.ones(1, 48, 40)), "48x40 mask: scale and crop the mask like the image"),
    (dict(noise_mask=torch.ones(3, 48, 48)), "3 masks for 2 image"),
    (dict(noise_mask=torch.full((48, 48), 2.0)), "outside 0..1"),
    (dict(noise_mask=torch.full((48, 48), float("nan"))), "outside 0..1"),
    (dict(noise_mask=torch.ones(48, 48, dtype=torch.long)), "int64 values"),
    (dict(noise_mask="all"), "got str"),
])
def test_bad_image_inputs(model, pair, latent, kwargs, message):
    args = {"init_latent": latent, **kwargs}
    with pytest.raises(JanusError, match=message):
        generate_flow_latents(model, pair, steps=1, **args)


def test_init_latent_with_an_autoregressive_model(latent):
    pro = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    with pytest.raises(JanusError, match="init_latent .* needs a JanusFlow model.*init_tokens"):
        generate_flow_latents(pro, "a cat", steps=1, init_latent=latent[:1], denoise=0.5)


# --- the JanusFlow ODE Sampler node with a LATENT ---------------------------------------------------------

@pytest.fixture(scope="module")
def handle():
    return node_model(FLOW_TINY)


@pytest.fixture(scope="module")
def node_pair(handle):
    prompt = DSJanusPromptEncoder().encode(handle, "Sunset over the sea.")[0]
    return DSJanusCFGPair().build(handle, prompt, 2)[0]


def test_node_img2img_from_a_vae_encode_latent(handle, node_pair, latent, monkeypatch):
    """VAE Encode's samples are unscaled SDXL-VAE latents; the node scales them, honours denoise, and returns
    unscaled samples again. The preview shows the kept input where the mask keeps it."""
    samples = latent_to_sdxl_vae(latent[:1])
    out = DSJanusFlowSampler().sample(handle, node_pair, 5, 3, 2.0, latent={"samples": samples}, denoise=0.6)[0]
    expected = generate_flow_latents(handle.model, node_pair, seed=5, steps=3, cfg_weight=2.0,
                                     init_latent=sdxl_vae_to_latent(samples), denoise=0.6)
    assert set(out) == {"samples"} and out["samples"].shape == (2, 4, 48, 48)
    assert torch.equal(out["samples"], latent_to_sdxl_vae(expected))
    plain = DSJanusFlowSampler().sample(handle, node_pair, 5, 3, 2.0)[0]
    assert torch.equal(DSJanusFlowSampler().sample(handle, node_pair, 5, 3, 2.0, latent={"samples": samples},
                                                   denoise=1.0)[0]["samples"], plain["samples"])

    # Set Latent Noise Mask: [N, 1, H, W] at the image's resolution, 1 = regenerate
    previews = []
    monkeypatch.setattr(comfy_services, "sdxl_latent_previewer", lambda device: previews.append)
    mask = half_mask(1, 384)
    out = DSJanusFlowSampler().sample(handle, node_pair, 5, 3, 2.0, latent={"samples": samples, "noise_mask": mask},
                                      denoise=0.6)[0]["samples"]
    keep = (slice(None), slice(None), slice(None), slice(24, None))
    torch.testing.assert_close(out[keep], samples.expand(2, -1, -1, -1)[keep], rtol=1e-6, atol=1e-6)
    assert (out[..., :24] - samples[..., :24]).abs().max() > 1e-2
    assert len(previews) == 3
    for p in previews:
        torch.testing.assert_close(p[keep], latent[:1][keep], rtol=1e-6, atol=1e-6)


def test_node_announces_the_img2img_estimate(handle, node_pair, latent, monkeypatch):
    announced = []
    monkeypatch.setattr(comfy_services, "ensure_loaded", lambda patcher, net, device, required: announced.append(
        required))
    DSJanusFlowSampler().sample(handle, node_pair, 0, 1, 2.0, latent={"samples": latent}, denoise=0.5)
    assert announced == [flow_bytes(handle.model, node_pair, 2.0, image_input=True)]
    assert announced[0] > flow_bytes(handle.model, node_pair, 2.0)


@pytest.mark.parametrize(("latent_input", "denoise", "message"), [
    (None, 0.5, "denoise < 1 needs an input latent"),
    ({"samples": torch.zeros(1, 4, 64, 64)}, 0.5, "encode a 384x384 image"),
    ({"samples": torch.zeros(1, 16, 48, 48)}, 0.5, "16 channels"),
    ({"samples": torch.zeros(3, 4, 48, 48)}, 0.5, "batch of 3"),
    ({"samples": torch.zeros(1, 4, 48, 48), "noise_mask": torch.ones(1, 1, 384, 300)}, 0.5, "384x300 mask"),
    ({"noise_mask": torch.ones(1, 1, 48, 48)}, 0.5, "LATENT with 'samples'"),
    ({"samples": torch.zeros(1, 16, 4, 48, 48)}, 0.5, r"5-D \[1, 16, 4, 48, 48\] \(a video latent\?\)"),
    ({"samples": torch.zeros(1, 4, 48, 48)}, 0.0, r"denoise must be in \(0, 1\]"),
])
def test_node_bad_latent_inputs(handle, node_pair, latent_input, denoise, message):
    with pytest.raises(JanusError, match=message):
        DSJanusFlowSampler().sample(handle, node_pair, 0, 1, 2.0, latent=latent_input, denoise=denoise)


def test_node_latent_with_an_autoregressive_model(handle, node_pair):
    pro = node_model(PRO_TINY)
    with pytest.raises(JanusError, match="init_latent .* needs a JanusFlow model"):
        DSJanusFlowSampler().sample(pro, node_pair, 0, 1, 2.0, latent={"samples": torch.zeros(1, 4, 48, 48)},
                                    denoise=0.5)
    with pytest.raises(JanusError, match="needs a JanusFlow"):  # without a latent: the flow sampler's own message
        DSJanusFlowSampler().sample(pro, node_pair, 0, 1, 2.0)


# --- encoding images in plain Python ---------------------------------------------------------------------

def test_encode_images_for_img2img(model, pair):
    pytest.importorskip("diffusers", reason="diffusers is optional (pip install diffusers) and not installed")
    vae = load_sdxl_vae(FLOW_TINY / "vae", device="cpu", dtype=torch.float32)
    picture = ImageOps.fit(Image.open(IMAGE_PATH).convert("RGB"), (384, 384))
    z = encode_images(vae, [picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert z.shape == (2, 4, 48, 48) and z.dtype == torch.float32
    # ComfyUI's VAE Encode: the latent distribution's mean of pixels in [-1, 1], then JanusFlow's scaling
    pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.inference_mode():
        mean = vae.encode(pixels.contiguous()).latent_dist.mean
    torch.testing.assert_close(z[:1], mean * 0.13025, rtol=0, atol=1e-4)  # batch of 2 vs 1: rounding
    # an IMAGE tensor gives the same latents; decoding them is the VAE round trip
    image = torch.from_numpy(np.array(picture)).float()[None] / 255.0
    torch.testing.assert_close(encode_images(vae, image), mean * 0.13025)
    assert decode_latents(vae, z).shape == (2, 384, 384, 3)
    # and they seed img2img: denoise -> 0 gives them back
    out = generate_flow_latents(model, pair, steps=2, init_latent=z, denoise=1e-6)
    torch.testing.assert_close(out, z, rtol=0, atol=1e-4)
    with pytest.raises(JanusError, match="needs 384x384 images, got 300x200; scale or crop"):
        encode_images(vae, Image.open(IMAGE_PATH))


def test_sampler_keeps_the_latent_entries_and_honours_batch_index(handle):
    """As core KSampler: noise_mask and batch_index travel on in the output, and an image picked out of a batch
    (Latent From Batch: batch_index [j]) starts from the noise it had there (seed + j)."""
    prompt = DSJanusPromptEncoder().encode(handle, "a lighthouse")[0]
    pair3, pair1 = (DSJanusCFGPair().build(handle, prompt, b)[0] for b in (3, 1))
    picture = torch.rand(1, 4, 48, 48)
    mask = torch.ones(1, 1, 48, 48)
    batch = DSJanusFlowSampler().sample(handle, pair3, 5, 2, 2.0, {"samples": picture.expand(3, -1, -1, -1)}, 0.7)[0]
    picked = {"samples": picture, "batch_index": [2], "noise_mask": mask}
    alone = DSJanusFlowSampler().sample(handle, pair1, 5, 2, 2.0, picked, 0.7)[0]
    assert alone.keys() == {"samples", "batch_index", "noise_mask"}
    assert alone["batch_index"] == [2] and alone["noise_mask"] is mask
    torch.testing.assert_close(alone["samples"][0], batch["samples"][2], atol=1e-4, rtol=1e-4)
    with pytest.raises(JanusError, match="batch_index must list one whole number >= 0 per image"):
        DSJanusFlowSampler().sample(handle, pair3, 5, 2, 2.0, {"samples": picture, "batch_index": [0, 1]}, 0.7)
