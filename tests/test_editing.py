"""Image-conditioned AR generation: instruction editing against the Janus-4o golden, VQ encoding, scoring, and
init tokens with a mask (inpainting / outpainting / variations) on janus-pro-tiny."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import janus_core
from janus_core import generate_ar
from janus_core.errors import JanusError
from janus_core.generate_ar import cfg_logit_steps, decode_image_tokens, generate_image_tokens, score_image_tokens
from janus_core.guidance import build_cfg_pair, guide, row_embeds
from janus_core.image_tokens import encode_image_tokens, pixel_mask_to_tokens
from janus_core.images import to_uint8
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY, close, golden

GRID = 24
N = GRID * GRID


@pytest.fixture(scope="module")
def model(pro):
    return pro


@pytest.fixture(scope="module")
def g():
    return golden(PRO_TINY, "edit_teacher_forced")


@pytest.fixture(scope="module")
def meta():
    return json.loads((PRO_TINY / "golden" / "edit_teacher_forced.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def image():
    return Image.open(IMAGE_PATH)


def image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).float().div(255)[None]


def random_tokens(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 4096, (rows, N), generator=torch.Generator().manual_seed(seed))


# --- against the golden of the original Janus-4o code -------------------------------------------------------

def test_input_pixels_and_vq_codes(model, g, image):
    assert torch.equal(model.image_processor.batch([image]), g["input_pixels"])
    assert torch.equal(encode_image_tokens(model, [image]), g["input_vq_codes"])
    assert torch.equal(janus_core.encode_image_tokens(model, image_tensor(image)), g["input_vq_codes"])


def test_editing_prompt_rows_and_embeddings(model, g, meta, image):
    pair = build_cfg_pair(model, meta["instruction"], image=image)
    assert pair.num_rows == 3 and pair.cond_ids.tolist() == meta["input_ids"]
    uncond = torch.tensor(meta["input_ids"])
    uncond[1:-1] = model.tokenizer.pad_id
    assert torch.equal(pair.uncond_ids, uncond)
    embeds, valid = row_embeds(model, pair)
    assert bool(valid.all())
    close(embeds, g["prefill_embeds"], rtol=1e-5)


def test_teacher_forced_logits_through_the_sampler_stream(model, g, meta, image):
    pair = build_cfg_pair(model, meta["instruction"], image=image)
    kept = g["kept_steps"].tolist()
    steps = cfg_logit_steps(model, pair)
    _, out = next(steps)
    for step in range(kept[-1] + 1):
        if step in kept:
            i = kept.index(step)
            close(out[0:1], g["full_logits"][i])
            close(out[1:2], g["part_logits"][i])
            close(out[2:3], g["uncond_logits"][i])
            close(guide(out, 3, meta["cfg_weight"], meta["cfg_weight2"]), g["mixed_logits"][i])
        if step < N - 1:
            _, out = steps.send(g["tokens"][:, step])
    steps.close()


def test_teacher_forced_logits_through_scoring(model, g, meta, image):
    scores = score_image_tokens(model, meta["instruction"], g["tokens"], cfg_weight=meta["cfg_weight"],
                                image=image_tensor(image), image_cfg_weight=meta["cfg_weight2"])
    assert scores.shape == (1, N, 4096) and scores.dtype == torch.float32
    close(scores[0, g["kept_steps"]], g["mixed_logits"][:, 0])


def test_decoded_image(model, g):
    diff = (to_uint8(decode_image_tokens(model, g["tokens"])).int() - g["decoded_uint8"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# --- the sampler and scoring agree ---------------------------------------------------------------------------

def recorded_logits(monkeypatch) -> list[torch.Tensor]:
    """The logits every draw of the sampler sees, in order (the rows that draw)."""
    seen = []
    real = generate_ar.sample_next

    def spy(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(generate_ar, "sample_next", spy)
    return seen


@pytest.mark.parametrize("edit", [False, True])
def test_sampler_draws_from_the_scored_logits(model, image, monkeypatch, edit):
    seen = recorded_logits(monkeypatch)
    args = {"image": image, "image_cfg_weight": 2.0} if edit else {"negative_prompt": "fog"}
    tokens = generate_image_tokens(model, "A red boat.", batch_size=2, seed=3, cfg_weight=4.0, **args)
    assert len(seen) == N
    scores = score_image_tokens(model, "A red boat.", tokens, cfg_weight=4.0, **args)
    close(torch.stack(seen, dim=1), scores)


def test_kept_rows_fed_as_one_block_give_the_same_logits(model, monkeypatch):
    """Keeping the first rows (outpainting downwards / a variation) feeds them at once after the prompt."""
    init = random_tokens(1, 5)
    mask = torch.zeros(GRID, GRID, dtype=torch.bool)
    mask[10:] = True
    seen = recorded_logits(monkeypatch)
    tokens = generate_image_tokens(model, "A house.", seed=1, init_tokens=init, mask=mask)
    assert torch.equal(tokens[:, :10 * GRID], init[:, :10 * GRID]) and len(seen) == N - 10 * GRID
    close(torch.cat(seen), score_image_tokens(model, "A house.", tokens)[0, 10 * GRID:])


# --- properties ----------------------------------------------------------------------------------------------

def test_mask_all_false_returns_init_tokens(model):
    init = random_tokens(1, 0)
    calls = []
    out = generate_image_tokens(model, "A cat.", batch_size=3, init_tokens=init[0],
                                mask=torch.zeros(N, dtype=torch.bool), callback=lambda *a: calls.append(a))
    assert torch.equal(out, init.expand(3, -1)) and calls == []


def test_kept_tokens_unchanged_and_masked_ones_resampled(model):
    init = random_tokens(2, 1)
    mask = torch.rand(2, GRID, GRID, generator=torch.Generator().manual_seed(2)) < 0.3
    out = generate_image_tokens(model, "A cat.", batch_size=2, seed=4, init_tokens=init, mask=mask)
    flat = mask.reshape(2, N)
    assert torch.equal(out[~flat], init[~flat])
    assert (out[flat] != init[flat]).float().mean() > 0.9


def test_mask_resampling_everything_is_plain_generation(model, image):
    everything = torch.ones(N, dtype=torch.bool)
    for args in ({}, {"image": image}):
        plain = generate_image_tokens(model, "A cat.", batch_size=2, seed=9, **args)
        masked = generate_image_tokens(model, "A cat.", batch_size=2, seed=9, init_tokens=random_tokens(2, 3),
                                       mask=everything, **args)
        assert torch.equal(plain, masked)


@pytest.mark.parametrize("case", ["edit", "inpaint", "edit+inpaint"])
def test_image_i_of_a_batch_is_a_batch_of_one_with_seed_plus_i(model, image, case):
    args = {"image": image_tensor(image)} if "edit" in case else {}
    init = random_tokens(3, 7)
    mask = torch.zeros(3, GRID, GRID, dtype=torch.bool)
    mask[0, 4:9, 3:20] = mask[1, 12:, :] = mask[2, 2:4] = True  # one mask per image, different kept prefixes
    if "inpaint" in case:
        args |= {"init_tokens": init, "mask": mask}
    batch = generate_image_tokens(model, "A lighthouse.", batch_size=3, seed=20, **args)
    assert len({tuple(r.tolist()) for r in batch}) == 3
    for i in range(3):
        if "inpaint" in case:
            args |= {"init_tokens": init[i], "mask": mask[i]}
        alone = generate_image_tokens(model, "A lighthouse.", batch_size=1, seed=20 + i, **args)
        assert torch.equal(alone[0], batch[i]), i


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("case", ["text", "edit", "inpaint"])
def test_image_i_of_a_batch_is_a_batch_of_one_in_bf16(image, case, quantize):
    """In bf16 too (what dtype auto runs on most CPUs and GPUs), as long as the images share one mask: no part of
    a step may depend on how many images run (a one-row bf16 matmul on the CPU rounds otherwise than several)."""
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize=quantize)
    args = {"image": image_tensor(image)} if case == "edit" else {}
    if case == "inpaint":
        mask = torch.zeros(GRID, GRID, dtype=torch.bool)
        mask[9:, 5:] = True
        args = {"init_tokens": random_tokens(1, 7)[0], "mask": mask}
    batch = generate_image_tokens(model, "A lighthouse.", batch_size=4, seed=7, **args)
    for i in range(4):
        alone = generate_image_tokens(model, "A lighthouse.", batch_size=1, seed=7 + i, **args)
        assert torch.equal(alone[0], batch[i]), i


def test_editing_differs_from_text_to_image_and_follows_image_cfg_weight(model, image):
    plain = generate_image_tokens(model, "A cat.", seed=2, top_k=1)
    edit = generate_image_tokens(model, "A cat.", seed=2, top_k=1, image=image)
    other = generate_image_tokens(model, "A cat.", seed=2, top_k=1, image=image, image_cfg_weight=0.5)
    assert not torch.equal(plain, edit) and not torch.equal(edit, other)


def test_pixel_mask_follows_the_image_preprocessing(model, image):
    """A 300x200 image is fitted to 384x256 and centred (64 px of padding above and below): the token rows 4..19
    hold the picture. A mask over the whole picture resamples exactly them; a dot resamples its token."""
    full = pixel_mask_to_tokens(model, torch.ones(1, 200, 300))
    expected = torch.zeros(1, GRID, GRID, dtype=torch.bool)
    expected[0, 4:20] = True
    assert torch.equal(full, expected)
    dot = torch.zeros(200, 300)
    dot[100, 150] = 1.0  # the centre pixel lands at (192, 192) of the fitted square: token (12, 12)
    tokens = pixel_mask_to_tokens(model, dot)
    assert tokens.shape == (1, GRID, GRID) and tokens.nonzero().tolist() == [[0, 12, 12]]
    assert not pixel_mask_to_tokens(model, torch.full((2, 384, 384), 0.49)).any()
    assert pixel_mask_to_tokens(model, torch.full((1, 384, 384), 0.5)).all()
    # the geometry of the pixels the VQ encoder sees: the picture fills pixel rows 64..319, grey padding the rest
    pixels = model.image_processor.batch([image])[0]
    grey = pixels[:, 0, 0]
    is_grey = (pixels == grey[:, None, None]).all(dim=0).all(dim=1)  # [384]: whole pixel row is padding
    assert bool(is_grey[:64].all()) and bool(is_grey[320:].all()) and not bool(is_grey[64:320].any())


@pytest.mark.parametrize(("size", "width"), [(1536, 1), (1536, 2), (768, 1), (4000, 1)])
def test_thin_strokes_on_large_masks_count(model, size, width):
    """A stroke a pixel or two wide on a picture larger than 384 px still marks every token it crosses
    (shrinking must not average it away)."""
    mask = torch.zeros(1, size, size)
    column = size // 2 + 7
    mask[0, size // 4: 3 * size // 4, column:column + width] = 1.0
    tokens = pixel_mask_to_tokens(model, mask)[0]
    col = int(column * 384 / size) // 16
    rows = tokens[:, col].nonzero().flatten().tolist()
    assert rows == list(range(int(size // 4 * 384 / size) // 16, int((3 * size // 4 - 1) * 384 / size) // 16 + 1))
    assert tokens.sum() == len(rows)  # only that column of tokens


# --- bad input -----------------------------------------------------------------------------------------------

def test_janusflow_cannot_edit_or_vq_encode(image):
    flow = janus_core.load_model(FLOW_TINY, device="cpu", dtype=torch.float32)
    with pytest.raises(JanusError, match="VQ encoding needs a Janus / Janus-Pro model.*JanusFlow has no"):
        encode_image_tokens(flow, [image])
    with pytest.raises(JanusError, match="Instruction editing needs a Janus / Janus-Pro model"):
        build_cfg_pair(flow, "Make it red.", image=image)
    with pytest.raises(JanusError, match="JanusFlow generates images with the flow sampler"):
        generate_image_tokens(flow, "Make it red.", image=image)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"init_tokens": torch.zeros(2, 100, dtype=torch.long), "mask": torch.ones(N, dtype=torch.bool)},
     r"init_tokens has shape \[2, 100\].*another model"),
    ({"init_tokens": torch.full((N,), 5000), "mask": torch.ones(N, dtype=torch.bool)},
     "ids from 5000 to 5000.*4096 entries.*another model"),
    ({"init_tokens": torch.zeros(N), "mask": torch.ones(N, dtype=torch.bool)}, "integer tensor"),
    ({"init_tokens": torch.zeros(3, N, dtype=torch.long), "mask": torch.ones(N, dtype=torch.bool)},
     "init_tokens holds 3 rows for a batch of 2"),
    ({"init_tokens": torch.zeros(N, dtype=torch.long), "mask": torch.ones(16, 16, dtype=torch.bool)},
     r"mask has shape \[16, 16\].*24 x 24"),
    ({"init_tokens": torch.zeros(N, dtype=torch.long), "mask": torch.ones(3, N, dtype=torch.bool)},
     "mask holds 3 rows for a batch of 2"),
    ({"init_tokens": torch.zeros(N, dtype=torch.long), "mask": torch.ones(N)}, "bool tensor.*pixel_mask_to_tokens"),
    ({"init_tokens": torch.zeros(N, dtype=torch.long)}, "the mask is missing"),
    ({"mask": torch.ones(N, dtype=torch.bool)}, "the init_tokens is missing"),
    ({"image_cfg_weight": -1.0}, r"image_cfg_weight must be in 0\.\.1000"),
    ({"image": torch.rand(2, 64, 64, 3)}, "one input image, got 2"),
    ({"image": torch.rand(64, 64, 3)}, r"shape \[64, 64, 3\], expected \[B, H, W, 3\]"),
    ({"image": torch.rand(1, 3, 64, 64)}, r"expected \[B, H, W, 3\]"),
])
def test_bad_image_arguments(model, kwargs, message):
    with pytest.raises(JanusError, match=message):
        generate_image_tokens(model, "A cat.", batch_size=2, **kwargs)


def test_bad_encode_score_and_pair_arguments(model, image):
    with pytest.raises(JanusError, match=r"expected \[B, H, W, 3\]"):
        encode_image_tokens(model, torch.rand(1, 64, 64))
    with pytest.raises(JanusError, match="No images were given"):
        encode_image_tokens(model, [])
    with pytest.raises(JanusError, match=r"integer tensor \[B, T\] with 1 <= T <= 576"):
        score_image_tokens(model, "A cat.", torch.zeros(1, 577, dtype=torch.long))
    with pytest.raises(JanusError, match="another model"):
        score_image_tokens(model, "A cat.", torch.full((1, 4), 4096))
    pair = build_cfg_pair(model, "A cat.", 2)
    with pytest.raises(JanusError, match="built for 2 images but 1 rows"):
        score_image_tokens(model, pair, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(JanusError, match="already fixes its rows"):
        generate_image_tokens(model, pair, image=image)
    with pytest.raises(JanusError, match="edit instruction is empty"):
        build_cfg_pair(model, " ", image=image)
    with pytest.raises(JanusError, match=r"MASK must be a tensor \[B, H, W\]"):
        pixel_mask_to_tokens(model, torch.ones(1, 1, 8, 8))
    with pytest.raises(JanusError, match="MASK holds values from 255 to 255.*divide them by 255"):
        pixel_mask_to_tokens(model, torch.full((8, 8), 255.0))
