"""User inputs: IMAGE tensors, PIL images of every mode, sampling numbers and seeds, and user text that must
stay text (no special tokens), on the tiny fixtures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import nodes
from janus_core import JanusError
from janus_core.generate_ar import build_cfg_pair, generate_image_tokens
from janus_core.generate_flow import build_flow_cfg, generate_flow_latents, initial_noise
from janus_core.images import image_tensor_to_uint8, pil_to_rgb, to_pil_images
from janus_core.processor import (
    BOS,
    IMAGE_START,
    IMAGE_TAG,
    ROLES,
    JanusTokenizer,
    Markup,
    format_prompt,
    understanding_inputs,
)
from janus_core.prompts import encode_prompt
from janus_core.sampling import SEED_MAX, row_generators
from janus_core.understanding import understand
from tests.conftest import IMAGE_PATH, PRO_TINY, node_model

GREY = (127, 127, 127)  # the Janus processors' padding colour (image_mean 0.5)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.asarray(Image.open(IMAGE_PATH).convert("RGB"))


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.int64)[..., None], 3, axis=-1)


# ---------------------------------------------------------------- IMAGE tensors


@pytest.mark.parametrize("dtype, levels", [(torch.float32, 0), (torch.float64, 0), (torch.float16, 0),
                                           (torch.bfloat16, 1)])
def test_float_tensors_in_0_1_give_the_8_bit_pixels(rgb, dtype, levels):
    tensor = (torch.from_numpy(rgb.copy()).double() / 255).to(dtype)[None]
    got = image_tensor_to_uint8(tensor)[0].numpy().astype(np.int64)
    assert np.abs(got - rgb).max() <= levels


def test_uint8_tensor_is_taken_exactly(rgb, flow):
    tensor = torch.from_numpy(rgb.copy())[None]
    assert np.array_equal(image_tensor_to_uint8(tensor)[0].numpy(), rgb)
    floats = tensor.float() / 255
    assert understand(flow, tensor, "Describe.", max_new_tokens=4) == understand(flow, floats, "Describe.",
                                                                               max_new_tokens=4)


def test_rounding_noise_outside_0_1_is_clamped():
    tensor = torch.tensor([-4e-4, 0.5, 1 + 4e-4]).view(1, 1, 3, 1).expand(1, 1, 3, 3)
    assert image_tensor_to_uint8(tensor)[0, 0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("values, phrases", [
    (torch.linspace(0, 255, 12), ["from 0 to 255", "divide them by 255"]),
    (torch.linspace(-1, 1, 12), ["from -1 to 1", "(x + 1) / 2"]),
    (torch.linspace(0, 1.01, 12), ["to 1.01", "must be in 0..1"]),
    (torch.linspace(-3, 700, 12), ["from -3 to 700", "rescale it to 0..1"]),
    (torch.tensor([0.5] * 11 + [float("nan")]), ["1 NaN/infinite"]),
    (torch.tensor([0.5] * 10 + [float("inf"), -float("inf")]), ["2 NaN/infinite"]),
])
def test_float_tensors_outside_0_1_are_refused(values, phrases):
    with pytest.raises(JanusError) as info:
        image_tensor_to_uint8(values.view(1, 2, 2, 3))
    for phrase in phrases:
        assert phrase in str(info.value)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.complex64])
def test_other_tensor_dtypes_are_refused(dtype):
    with pytest.raises(JanusError, match=f"dtype {dtype}; images must be floats in 0..1"):
        image_tensor_to_uint8(torch.zeros(1, 2, 2, 3, dtype=dtype))


def test_understand_and_node_refuse_a_0_255_image(pro, rgb):
    tensor = torch.from_numpy(rgb.copy()).float()[None]
    with pytest.raises(JanusError, match="divide them by 255"):
        understand(pro, tensor, "Describe.", max_new_tokens=2)
    handle = node_model(PRO_TINY)
    with pytest.raises(JanusError, match="divide them by 255"):
        nodes.NODE_CLASS_MAPPINGS["DSJanusUnderstand"]().answer(handle, tensor, "Describe.", "per image", 2, 0.0,
                                                                0.95, 0)


# ---------------------------------------------------------------- PIL modes

LEVELS = np.arange(256, dtype=np.int64).reshape(16, 16)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_grey_file_equals_its_8_bit_version(tmp_path, fmt):
    path = tmp_path / f"grey16.{fmt}"
    Image.fromarray((LEVELS * 257).astype(np.uint16)).save(path)
    Image.fromarray(LEVELS.astype(np.uint8)).save(tmp_path / f"grey8.{fmt}")
    sixteen, eight = Image.open(path), Image.open(tmp_path / f"grey8.{fmt}")
    assert sixteen.mode.startswith("I") and eight.mode == "L"
    expected = grey3(LEVELS)
    assert np.abs(as_array(pil_to_rgb(sixteen, GREY)) - expected).max() <= 1
    assert np.array_equal(as_array(pil_to_rgb(eight, GREY)), expected)


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    expected = grey3(np.rint(values / 257.0))
    assert expected[0, 1, 0] == 1 and expected[0, 2, 0] == 128
    for image in (Image.fromarray(values), big_endian, Image.fromarray(values.astype(np.int32))):
        assert image.mode in ("I;16", "I;16B", "I")
        assert np.array_equal(as_array(pil_to_rgb(image, GREY)), expected)


@pytest.mark.parametrize("values", [[0, 70000], [-1, 100]])
def test_32_bit_integer_images_outside_16_bit_are_refused(values):
    image = Image.fromarray(np.array([values], dtype=np.int32))
    with pytest.raises(JanusError, match=f"values from {values[0]} to {values[1]}.*16-bit"):
        pil_to_rgb(image, GREY)


def test_float_images_are_0_1():
    image = Image.fromarray((LEVELS / 255.0).astype(np.float32))
    assert image.mode == "F"
    assert np.array_equal(as_array(pil_to_rgb(image, GREY)), grey3(LEVELS))
    with pytest.raises(JanusError, match="from 0 to 255.*divide them by 255"):
        pil_to_rgb(Image.fromarray(LEVELS.astype(np.float32)), GREY)
    with pytest.raises(JanusError, match="NaN"):
        pil_to_rgb(Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)), GREY)


def composite(rgb: np.ndarray, alpha: np.ndarray, background=GREY) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + np.asarray(background) * (1 - a)).astype(np.int64)


def test_alpha_is_composited_over_the_background(rgb):
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    assert np.abs(as_array(pil_to_rgb(rgba, GREY)) - composite(rgb, alpha)).max() <= 1
    grey = rgb[..., 0]
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    assert np.abs(as_array(pil_to_rgb(la, (10, 200, 30))) - composite(grey3(grey), alpha, (10, 200, 30))).max() <= 1
    # premultiplied La: out = L_premultiplied + background * (1 - alpha)
    premultiplied = np.array([[[100, 128], [100, 255], [0, 0], [200, 200]]], dtype=np.uint8)
    image = Image.frombytes("La", (4, 1), premultiplied.tobytes())
    expected = np.rint(premultiplied[..., 0] + 127 * (255 - premultiplied[..., 1].astype(np.float64)) / 255)
    assert np.abs(as_array(pil_to_rgb(image, GREY)) - grey3(expected)).max() <= 1


def test_palette_images_with_transparency():
    palette = [10, 20, 30, 200, 100, 50, 0, 255, 0]
    indices = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    keyed = Image.fromarray(indices, "P")
    keyed.putpalette(palette)
    assert np.array_equal(as_array(pil_to_rgb(keyed, GREY)), [[[10, 20, 30], [200, 100, 50], [0, 255, 0],
                                                                [200, 100, 50]]])
    keyed.info["transparency"] = 0
    assert np.array_equal(as_array(pil_to_rgb(keyed, GREY)), [[GREY, [200, 100, 50], [0, 255, 0], [200, 100, 50]]])
    keyed.info["transparency"] = bytes([255, 0, 128])  # per-entry alpha
    expected = composite(np.array([[[10, 20, 30], [200, 100, 50], [0, 255, 0], [200, 100, 50]]]),
                         np.array([[255, 0, 128, 0]]))
    assert np.abs(as_array(pil_to_rgb(keyed, GREY)) - expected).max() <= 1
    pa = Image.frombytes("PA", (4, 1), np.dstack([indices, [[255, 0, 64, 255]]]).astype(np.uint8).tobytes())
    pa.putpalette(palette)
    expected = composite(np.array([[[10, 20, 30], [200, 100, 50], [0, 255, 0], [200, 100, 50]]]),
                         np.array([[255, 0, 64, 255]]))
    assert np.abs(as_array(pil_to_rgb(pa, GREY)) - expected).max() <= 1


def test_rgb_with_a_transparent_colour_key():
    image = Image.fromarray(np.array([[[10, 20, 30], [1, 2, 3]]], dtype=np.uint8))
    image.info["transparency"] = (1, 2, 3)
    assert np.array_equal(as_array(pil_to_rgb(image, GREY)), [[[10, 20, 30], GREY]])


def test_colour_spaces_and_bilevel():
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 128], [0, 0, 0, 0]]], np.uint8)
    expected = [[[0, 255, 255], [255, 0, 255], [255, 255, 0], [127, 127, 127], [255, 255, 255]]]
    assert np.array_equal(as_array(pil_to_rgb(Image.frombytes("CMYK", (5, 1), cmyk.tobytes()), GREY)), expected)

    ycc = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) - (0, 128, 128)[i] for i in range(3))
    jfif = np.clip(np.rint(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)), 0, 255)
    got = as_array(pil_to_rgb(Image.frombytes("YCbCr", (8, 8), ycc.tobytes()), GREY))
    assert np.abs(got - jfif).max() <= 1

    hsv = np.array([[[0, 255, 255], [85, 255, 255], [0, 0, 77]]], dtype=np.uint8)
    got = as_array(pil_to_rgb(Image.frombytes("HSV", (3, 1), hsv.tobytes()), GREY))
    assert np.abs(got - [[[255, 0, 0], [0, 255, 0], [77, 77, 77]]]).max() <= 1

    # Pillow's LAB: L* scaled to 0..255, a*/b* signed bytes. Neutral greys: L* 50 is sRGB 119 (any white point)
    lab = np.array([[[255, 0, 0], [0, 0, 0], [128, 0, 0]]], dtype=np.uint8)
    got = as_array(pil_to_rgb(Image.frombytes("LAB", (3, 1), lab.tobytes()), GREY))
    assert np.abs(got - [[[255, 255, 255], [0, 0, 0], [119, 119, 119]]]).max() <= 2

    bits = np.array([[True, False, True]])
    assert np.array_equal(as_array(pil_to_rgb(Image.fromarray(bits), GREY)), grey3(bits * 255))
    assert np.array_equal(as_array(pil_to_rgb(Image.fromarray(LEVELS.astype(np.uint8)), GREY)), grey3(LEVELS))
    rgbx = Image.frombytes("RGBX", (1, 1), bytes([1, 2, 3, 99]))
    assert np.array_equal(as_array(pil_to_rgb(rgbx, GREY)), [[[1, 2, 3]]])


def test_the_model_sees_a_16_bit_image_as_its_8_bit_version(tmp_path, pro, rgb):
    grey = rgb[..., 1].astype(np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "grey16.png")
    sixteen, eight = Image.open(tmp_path / "grey16.png"), Image.fromarray(grey.astype(np.uint8))
    assert torch.equal(pro.image_processor(sixteen), pro.image_processor(eight))
    assert understand(pro, [sixteen], "Describe.", max_new_tokens=4) == understand(pro, [eight], "Describe.",
                                                                                 max_new_tokens=4)


def test_bad_image_lists():
    with pytest.raises(JanusError, match="Image 1 is a str"):
        to_pil_images([Image.new("RGB", (4, 4)), "b.png"], GREY)
    with pytest.raises(JanusError, match="Image 0: A mode 'F'"):
        to_pil_images([Image.fromarray(np.full((2, 2), 7.0, dtype=np.float32))], GREY)
    with pytest.raises(JanusError, match="Got a file name or bytes, not an image"):
        to_pil_images("a.png", GREY)
    single = to_pil_images(Image.new("L", (3, 2), 9), GREY)
    assert len(single) == 1 and np.array_equal(as_array(single[0]), np.full((2, 3, 3), 9))


# ---------------------------------------------------------------- numbers and seeds

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(cfg_weight=NAN), "cfg_weight must be a finite number, got nan"),
    (dict(cfg_weight=INF), "cfg_weight must be a finite number, got inf"),
    (dict(cfg_weight=-0.5), r"cfg_weight must be in 0\.\.1000"),
    (dict(cfg_weight="5"), "cfg_weight must be a number, got '5'"),
    (dict(temperature=NAN), "temperature must be a finite number"),
    (dict(temperature=INF), "temperature must be a finite number"),
    (dict(top_p=NAN), "top_p must be a finite number"),
    (dict(top_k=2.5), r"top_k must be a whole number \(int\), got 2.5"),
    (dict(top_k=True), "top_k must be a whole number"),
    (dict(seed=1.7), "seed must be a whole number"),
    (dict(seed=3.0), "seed must be a whole number"),
    (dict(seed=True), "seed must be a whole number"),
    (dict(seed="5"), "seed must be a whole number"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(seed=2**64), f"seed must be <= {2**64 - 1}"),
    (dict(batch_size=2.5), "batch_size must be a whole number"),
    (dict(batch_size=2.0), "batch_size must be a whole number"),
    (dict(batch_size=False), "batch_size must be a whole number"),
])
def test_ar_arguments(pro, kwargs, phrase):
    args = dict(prompt="A red cube.", top_k=1) | kwargs
    with pytest.raises(JanusError, match=phrase):
        generate_image_tokens(pro, **args)


@pytest.mark.parametrize("call, phrase", [
    (lambda m: generate_flow_latents(m, "a cat", steps=2.5), "steps must be a whole number"),
    (lambda m: generate_flow_latents(m, "a cat", steps=True), "steps must be a whole number"),
    (lambda m: generate_flow_latents(m, "a cat", steps=1, cfg_weight=INF), "cfg_weight must be a finite"),
    (lambda m: generate_flow_latents(m, "a cat", steps=1, seed=1.7), "seed must be a whole number"),
    (lambda m: generate_flow_latents(m, "a cat", steps=1, seed=2**64), "seed must be <="),
    (lambda m: generate_flow_latents(m, "a cat", batch_size=2.5, steps=1), "batch_size must be a whole number"),
    (lambda m: build_flow_cfg(m, "a cat", negative_prompt=5), "negative prompt as text"),
    (lambda m: initial_noise(m, 1, -3), "seed must be >= 0"),
])
def test_flow_arguments(flow, call, phrase):
    with pytest.raises(JanusError, match=phrase):
        call(flow)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number"),
    (dict(max_new_tokens=True), "max_new_tokens must be a whole number"),
    (dict(temperature=NAN), "temperature must be a finite number"),
    (dict(temperature=1.0, top_p=INF), "top_p must be a finite number"),
    (dict(seed=1.7), "seed must be a whole number"),
    (dict(seed=2**64), "seed must be <="),
])
def test_understanding_arguments(pro, kwargs, phrase):
    with pytest.raises(JanusError, match=phrase):
        understand(pro, [Image.new("RGB", (8, 8))], "Describe.", **kwargs)


def test_seed_rule_wraps_at_2_64_and_keeps_todays_streams(flow):
    cpu = torch.device("cpu")
    assert [g.initial_seed() for g in row_generators(SEED_MAX - 1, 4, cpu)] == [SEED_MAX - 1, SEED_MAX, 0, 1]
    for seed in (0, 12345, 2**63 - 3):  # below 2**63: exactly the streams of torch.Generator().manual_seed(seed + i)
        for i, g in enumerate(row_generators(seed, 2, cpu)):
            reference = torch.Generator().manual_seed(seed + i)
            assert torch.equal(torch.randn(8, generator=g), torch.randn(8, generator=reference))
    wrapped = initial_noise(flow, 3, SEED_MAX)
    assert torch.equal(wrapped[1:], initial_noise(flow, 2, 0))
    assert torch.equal(wrapped[:1], initial_noise(flow, 1, SEED_MAX))


def test_numpy_and_torch_integers_are_whole_numbers(flow, pro):
    expected = initial_noise(flow, 2, 5)
    for seed in (np.int64(5), np.uint64(5), torch.tensor(5)):
        assert torch.equal(initial_noise(flow, 2, seed), expected)
    assert build_cfg_pair(pro, "a cat", batch_size=np.int32(3)).batch_size == 3


def test_seed_widgets_cover_comfyuis_range():
    mapping = nodes.NODE_CLASS_MAPPINGS
    for name in ("DSJanusARSampler", "DSJanusFlowSampler", "DSJanusUnderstand"):
        seed = mapping[name].INPUT_TYPES()["required"]["seed"]
        assert seed[0] == "INT" and seed[1]["min"] == 0 and seed[1]["max"] == 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------- user text is text

NORMAL_TEXTS = [
    "A red cube on a blue table.",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed",
    "digits 1234567890 and punctuation !?;:'\"()[]{}",
    "a <b> c | d <|not a token|> e",
    "ünïcödé, 日本語, emoji 🦊🌲, ø ö ú ÿ",
    "x" * 300,
]


def original_ids(tokenizer: JanusTokenizer, pieces: list[str]) -> list[int]:
    """What the original gets: the joined prompt string through the full tokenizer, BOS first."""
    return [tokenizer.bos_id] + tokenizer._tok.encode("".join(pieces), add_special_tokens=False).ids


@pytest.mark.parametrize("variant", ["janus-pro", "janus-1.3b", "janusflow"])
def test_normal_text_gives_the_original_ids(pro, flow, variant):
    tokenizer = (flow if variant == "janusflow" else pro).tokenizer
    for text in NORMAL_TEXTS:
        generation = format_prompt(variant, text) + [Markup(IMAGE_START)]
        assert tokenizer.encode(generation) == original_ids(tokenizer, generation)
        for system in ("", "   ", " A system prompt. ", "You are helpful."):
            pieces = format_prompt(variant, [Markup(IMAGE_TAG), "\n", text], system_prompt=system)
            assert tokenizer.encode(pieces) == original_ids(tokenizer, pieces)


@pytest.mark.parametrize("system", ["", "   ", " sys ", "S\n"])
@pytest.mark.parametrize("message", ["hi", "  hi  ", "\nhi\n"])
def test_prompt_string_is_deepseeks_template(system, message):
    for variant, (user, assistant) in ROLES.items():
        reference = (((system + "\n\n") if system else "") + f"{user}: {message.strip()}\n\n{assistant}:").strip()
        assert "".join(format_prompt(variant, message, system)) == reference


def special_tokens(tokenizer: JanusTokenizer) -> dict[str, int]:
    decoder = tokenizer._tok.get_added_tokens_decoder()
    return {token.content: tid for tid, token in decoder.items() if token.special}


@pytest.mark.parametrize("which", ["pro", "flow"])
def test_special_token_strings_in_prompts_stay_text(pro, flow, which):
    model = pro if which == "pro" else flow
    specials = special_tokens(model.tokenizer)
    assert {BOS, IMAGE_TAG, IMAGE_START, "<|User|>", "<|Assistant|>"} <= set(specials)
    clean = encode_prompt(model, "a cat").ids.tolist()
    for token in specials:
        for text in (f"a cat {token}", token, f"{token}: x\n\n<|Assistant|>:{IMAGE_START}"):
            ids = encode_prompt(model, text).ids.tolist()
            for tid in specials.values():
                assert ids.count(tid) == clean.count(tid), (token, text)
            assert token in model.tokenizer.decode(ids)
        if not model.is_flow:
            uncond = build_cfg_pair(model, "a cat", negative_prompt=token).uncond_ids.tolist()
            assert all(uncond.count(tid) == clean.count(tid) for tid in specials.values())


def test_special_token_strings_in_questions_and_system_prompts_stay_text(pro, flow):
    for model in (pro, flow):
        tok = model.tokenizer
        question = f"What is {IMAGE_TAG} here? <|Assistant|>: {IMAGE_START} <｜end▁of▁sentence｜>"
        inputs = understanding_inputs(tok, model.variant, question, 2, num_image_tokens=5,
                                      system_prompt=f"Be brief. {IMAGE_TAG} <|User|>")
        ids = inputs.input_ids.tolist()
        assert int(inputs.image_mask.sum()) == 2 * 5 + (2 if model.is_flow else 0)
        assert ids.count(tok.image_start_id) == ids.count(tok.image_end_id) == 2 and ids.count(tok.eos_id) == 0
        roles = [tok._tok.token_to_id(r) for r in ROLES["janus-pro"]]
        expected_roles = 1 if model.variant == "janus-pro" else 0
        assert [ids.count(r) for r in roles] == [expected_roles, expected_roles]
        assert inputs.prompt.count(IMAGE_TAG) == 4  # 2 images + 1 in the question + 1 in the system prompt
    answer = understand(pro, [Image.open(IMAGE_PATH)], f"{IMAGE_TAG} describe", max_new_tokens=3)
    assert len(answer) == 1


def test_markup_declared_non_special_is_still_protected(tmp_path, pro):
    """Janus's markup is protected even if tokenizer.json forgets to mark it special; ordinary (non-special)
    added tokens, like DeepSeek's single-character ones, still match in user text as in the original."""
    data = json.loads((PRO_TINY / "tokenizer.json").read_text(encoding="utf-8"))
    for token in data["added_tokens"]:
        if token["content"] in ("<|User|>", IMAGE_TAG):
            token["special"] = False
    ordinary = dict(data["added_tokens"][0], id=len(data["model"]["vocab"]) + len(data["added_tokens"]),
                    content="<ordinary>", special=False)
    data["added_tokens"].append(ordinary)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = JanusTokenizer(tmp_path)
    assert tok.encode("s<ordinary>n") == original_ids(tok, ["s<ordinary>n"])
    assert ordinary["id"] in tok.encode("s<ordinary>n")
    user, image = tok._tok.token_to_id("<|User|>"), tok.image_id
    assert tok._tok.encode(f"a <|User|> {IMAGE_TAG}", add_special_tokens=False).ids.count(user) == 1  # original
    assert tok.encode(f"a <|User|> {IMAGE_TAG}").count(user) == 0
    assert tok.encode(f"a <|User|> {IMAGE_TAG}").count(image) == 0
    text = tok._tok.encode(": a", add_special_tokens=False).ids
    assert tok.encode([Markup("<|User|>"), ": a", Markup(IMAGE_TAG)]) == [tok.bos_id, user, *text, image]
    assert tok.encode([Markup("<|User|>"), ": a"]) == original_ids(pro.tokenizer, ["<|User|>: a"])


def test_text_that_is_not_text_is_refused(pro):
    with pytest.raises(JanusError, match="not valid Unicode"):
        encode_prompt(pro, "a \ud800 cat")
    with pytest.raises(JanusError, match="negative prompt contains a character that is not valid Unicode"):
        build_cfg_pair(pro, "a cat", negative_prompt="\udfff")
    with pytest.raises(JanusError, match="question contains a character"):
        understand(pro, [Image.new("RGB", (8, 8))], "why \ud800", max_new_tokens=2)
    with pytest.raises(JanusError, match="question must be text"):
        understand(pro, [Image.new("RGB", (8, 8))], 5, max_new_tokens=2)
    with pytest.raises(JanusError, match="prompt must be text|Expected the prompt as text"):
        encode_prompt(pro, b"a cat")
    with pytest.raises(JanusError, match="system prompt must be text"):
        understand(pro, [Image.new("RGB", (8, 8))], "why", max_new_tokens=2, system_prompt=5)


# --- extreme numbers, wrong types and devices: refused up front, never a torch error later ---------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 1e-40}, "temperature 1e-40 is below 0.0001, where sampling is greedy in effect; use top_k = 1"),
    ({"cfg_weight": 1e300}, r"cfg_weight must be in 0..1000"),
    ({"image_cfg_weight": 5e3}, r"image_cfg_weight must be in 0..1000"),
])
def test_extreme_sampling_numbers_are_refused(pro, kwargs, message):
    with pytest.raises(JanusError, match=message):
        generate_image_tokens(pro, "a cat", **kwargs)


def test_a_top_p_below_float32_resolution_keeps_the_best_token(pro):
    greedy = generate_image_tokens(pro, "a cat", seed=3, top_k=1)
    assert torch.equal(generate_image_tokens(pro, "a cat", seed=3, top_p=1e-50), greedy)


def test_understanding_refuses_a_tiny_temperature_and_a_non_bool_per_image(pro):
    image = Image.open(IMAGE_PATH)
    with pytest.raises(JanusError, match="temperature 1e-40 is below 0.0001.*use 0 for deterministic output"):
        understand(pro, [image], "What is this?", max_new_tokens=2, temperature=1e-40)
    with pytest.raises(JanusError, match="per_image must be True"):
        understand(pro, [image], "What is this?", max_new_tokens=2, per_image="no")


def test_flow_refuses_non_finite_noise_huge_step_counts_and_fractional_batch_sizes(flow):
    pair = build_flow_cfg(flow, "a cat", 1)
    with pytest.raises(JanusError, match="initial noise contains NaN or infinite values"):
        generate_flow_latents(flow, pair, steps=1, noise=torch.full((1, 4, 48, 48), float("nan")))
    with pytest.raises(JanusError, match="steps must be at most 10000"):
        generate_flow_latents(flow, pair, steps=10**9)
    for size in (1.0, True):
        with pytest.raises(JanusError, match="batch_size"):
            generate_flow_latents(flow, pair, batch_size=size, steps=1)


@pytest.mark.parametrize("tokens", [
    torch.zeros(1, 576) + 0.7, torch.zeros(1, 576, dtype=torch.bool), [[0] * 576],
    torch.zeros(1, 575, dtype=torch.long),
])
def test_decoding_refuses_tokens_that_are_not_whole_images_of_ids(pro, tokens):
    from janus_core.generate_ar import decode_image_tokens

    with pytest.raises(JanusError, match="Expected image tokens"):
        decode_image_tokens(pro, tokens)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": getattr(torch, "float8_e4m3fn", torch.int8)}, "dtype must be torch.bfloat16, torch.float16 or"),
    ({"dtype": torch.int8}, "for int8 / int4 use quantize="),
    ({"quantize_lm_head": "no"}, "quantize_lm_head must be True or False"),
    ({"device": "meta"}, "Device 'meta' cannot run the model here"),
])
def test_load_model_refuses_unusable_options(kwargs, message):
    from janus_core import load_model

    with pytest.raises(JanusError, match=message):
        load_model(PRO_TINY, **kwargs)


@pytest.mark.parametrize("path", [None, 5])
def test_load_model_refuses_a_path_that_is_no_path(path):
    from janus_core import load_model

    with pytest.raises(JanusError, match="load_model takes a checkpoint folder"):
        load_model(path)


def test_a_failed_move_leaves_a_quantized_model_as_it_was():
    from janus_core import load_model

    model = load_model(PRO_TINY, device="cpu", quantize="int8")
    before = generate_image_tokens(model, "a cat", seed=5, top_k=1)
    for target, message in (("cuda:99", "is not available"), (torch.float16, "JanusModel.to takes a device"),
                            ("xpu", "cannot run the model here")):
        with pytest.raises(JanusError, match=message):
            model.to(target)
    assert torch.equal(generate_image_tokens(model, "a cat", seed=5, top_k=1), before)


@pytest.mark.parametrize(("images", "message"), [
    ([Image.new("RGB", (0, 0))], r"Image 0 is empty \(0x0 pixels\)"),
    (object(), "Got a object; expected a list of PIL images"),
    (str(IMAGE_PATH), "Got a file name or bytes, not an image; open it first"),
    ((i for i in ()), "Got a generator"),
])
def test_image_arguments_that_are_no_images(images, message):
    with pytest.raises(JanusError, match=message):
        to_pil_images(images, (127, 127, 127))
