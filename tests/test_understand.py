"""Image understanding against the goldens of DeepSeek's original code (janus-pro-tiny, janusflow-tiny)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from janus_core import JanusError, load_model
from janus_core.images import to_pil_images
from janus_core.understanding import generate_text_ids, understand, understanding_embeds
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY, golden, teacher_forced_answer_logits

QUESTION = "Describe this image."


@pytest.fixture(scope="module", params=["pro", "flow"])
def case(request, pro, flow):
    """(model, golden tensors, golden json) for each fixture."""
    model, folder = (pro, PRO_TINY) if request.param == "pro" else (flow, FLOW_TINY)
    info = json.loads((folder / "golden" / "understanding.json").read_text(encoding="utf-8"))
    return model, golden(folder, "understanding"), info


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(IMAGE_PATH).convert("RGB")


def test_prompt_pixels_and_embeds_match_golden(case, image):
    model, gold, info = case
    embeds, inputs = understanding_embeds(model, [image], QUESTION)
    assert inputs.prompt == info["sft_format"]
    assert inputs.input_ids.tolist() == gold["input_ids"][0].tolist() == info["input_ids"]
    assert torch.equal(inputs.image_mask, gold["images_seq_mask"][0])
    pixels = model.image_processor(image)
    torch.testing.assert_close(pixels, gold["pixel_values"][0, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embeds, gold["inputs_embeds"][0], rtol=1e-4, atol=1e-5)


def test_teacher_forced_logits_match_golden(case, image):
    model, gold, _ = case
    logits = teacher_forced_answer_logits(model, image, QUESTION, gold["generated_ids"])
    torch.testing.assert_close(logits, gold["step_logits"], rtol=1e-4, atol=1e-4)


def test_greedy_answer_matches_golden(case, image):
    model, gold, info = case
    embeds, _ = understanding_embeds(model, [image], QUESTION)
    ids = generate_text_ids(model, [embeds], max_new_tokens=20)
    assert ids == [gold["generated_ids"].tolist()]
    assert len(ids[0]) == info["num_generated"]
    if model.variant == "janus-pro":
        assert ids[0][-1] == model.tokenizer.eos_id and len(ids[0]) == 16
    assert understand(model, [image], QUESTION, max_new_tokens=20) == [info["generated_text"]]


def test_per_image_and_all_images(pro, image):
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    single = understand(pro, [image], QUESTION, max_new_tokens=12)
    per_image = understand(pro, [image, flipped], QUESTION, max_new_tokens=12)
    assert len(per_image) == 2 and per_image[0] == single[0]
    assert per_image[1] == understand(pro, [flipped], QUESTION, max_new_tokens=12)[0]
    together = understand(pro, [image, flipped], QUESTION, max_new_tokens=12, per_image=False)
    assert len(together) == 1
    _, inputs = understanding_embeds(pro, [image, flipped], QUESTION)
    tok = pro.tokenizer
    assert inputs.prompt.count("<image_placeholder>\n") == 2
    assert int((inputs.input_ids == tok.image_start_id).sum()) == 2
    assert int((inputs.input_ids == tok.image_end_id).sum()) == 2
    assert int(inputs.image_mask.sum()) == 2 * 576


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_left_padded_rows_equal_single_rows(flow, image, temperature):
    short, _ = understanding_embeds(flow, [image], "Why?", system_prompt="")
    long, _ = understanding_embeds(flow, [image], "What is in the picture, and what colours does it have?")
    assert short.shape[0] < long.shape[0]
    args = dict(max_new_tokens=10, temperature=temperature, top_p=0.9)
    batched = generate_text_ids(flow, [short, long], seed=5, **args)
    assert batched[0] == generate_text_ids(flow, [short], seed=5, **args)[0]
    assert batched[1] == generate_text_ids(flow, [long], seed=6, **args)[0]


def test_image_modes_and_sizes(pro, image):
    rgba = image.convert("RGBA")
    expected = understand(pro, [image], QUESTION, max_new_tokens=6)
    assert understand(pro, [rgba], QUESTION, max_new_tokens=6) == expected
    odd = Image.fromarray(np.random.default_rng(0).integers(0, 256, (91, 37, 3), dtype=np.uint8))
    inputs = [image.convert("L"), image.convert("P"), odd, odd.convert("LA")]
    answers = understand(pro, inputs, QUESTION, max_new_tokens=6)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)


def test_image_tensor_equals_pil(flow):
    loaded = Image.open(IMAGE_PATH)
    tensor = torch.from_numpy(np.array(loaded.convert("RGB")).astype(np.float32) / 255.0)[None]
    pixels = to_pil_images(tensor, flow.image_processor.background)[0]
    assert np.array_equal(np.asarray(pixels), np.asarray(loaded.convert("RGB")))
    assert understand(flow, tensor, QUESTION, max_new_tokens=8) == understand(flow, [loaded], QUESTION,
                                                                                max_new_tokens=8)


def test_sampling_is_reproducible(pro, image):
    args = dict(max_new_tokens=12, temperature=1.0, top_p=1.0)
    first = understand(pro, [image], QUESTION, seed=7, **args)
    assert first == understand(pro, [image], QUESTION, seed=7, **args)
    assert first != understand(pro, [image], QUESTION, seed=8, **args)


def test_callback_progress_and_cancel(pro, image):
    calls = []
    understand(pro, [image], QUESTION, max_new_tokens=5, callback=lambda *args: calls.append(args))
    assert calls == [(i, 5) for i in range(1, 6)]

    class Cancelled(Exception):
        pass

    def cancel(step, total):
        if step == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        understand(pro, [image], QUESTION, max_new_tokens=5, callback=cancel)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(question="  "), "question is empty"),
    (dict(images=torch.zeros(64, 64, 3)), "expected [B, H, W, 3]"),
    (dict(images=torch.zeros(1, 3, 64, 64)), "shape [1, 3, 64, 64]"),
    (dict(images=torch.zeros(1, 64, 64, 4)), "expected [B, H, W, 3]"),
    (dict(images=torch.zeros(0, 64, 64, 3)), "no pixels"),
    (dict(images=[]), "No images"),
    (dict(images=["photo.png"]), "expected PIL images"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(max_new_tokens=16000), "more than the model's context of 16384"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
])
def test_bad_input_raises(pro, image, kwargs, phrase):
    args = dict(images=[image], question=QUESTION) | kwargs
    with pytest.raises(JanusError) as info:
        understand(pro, **args)
    assert phrase in str(info.value)


def test_too_many_images_for_one_prompt(pro, image):
    with pytest.raises(JanusError, match="28 images at 578 tokens each"):
        understand(pro, [image] * 28, QUESTION, max_new_tokens=100, per_image=False)


def test_bfloat16_model(image):
    model = load_model(PRO_TINY, dtype=torch.bfloat16)
    embeds, _ = understanding_embeds(model, [image], QUESTION)
    assert embeds.dtype == torch.bfloat16
    answers = understand(model, [image, image], QUESTION, max_new_tokens=4, temperature=0.5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
