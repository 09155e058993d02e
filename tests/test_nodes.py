"""The nodes called directly (no ComfyUI): each node's contract on the tiny fixtures."""

import pytest
import torch

import nodes
from janus_core.errors import JanusError
from janus_core.generate_ar import build_cfg_pair, decode_image_tokens, generate_image_tokens
from janus_core.generate_flow import generate_flow_latents, latent_to_sdxl_vae
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY, node_model

N = nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def pro():
    return node_model(PRO_TINY)


@pytest.fixture(scope="module")
def flow():
    return node_model(FLOW_TINY)


def test_every_node_is_declared_completely():
    assert set(N) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in N.items():
        assert name.startswith("DSJanus") and cls.CATEGORY == "Janus" and cls.DESCRIPTION
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for input_name, declaration in section.items():
                assert declaration[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert callable(getattr(cls, cls.FUNCTION))
        assert all(t.startswith("DSJANUS_") or t in {"IMAGE", "LATENT", "STRING"} for t in cls.RETURN_TYPES)


def test_text_to_image_chain(pro):
    prompt = N["DSJanusPromptEncoder"]().encode(pro, "A red cube on a blue table.")[0]
    negative = N["DSJanusPromptEncoder"]().encode(pro, "blurry")[0]
    pair = N["DSJanusCFGPair"]().build(pro, prompt, 2, negative)[0]
    tokens = N["DSJanusARSampler"]().sample(pro, pair, 7, 5.0, 1.0, 0, 1.0)[0]
    assert tokens.tokens.shape == (2, 576) and tokens.tokens.dtype == torch.long
    expected = generate_image_tokens(pro.model, build_cfg_pair(pro.model, prompt, 2, negative), seed=7)
    assert torch.equal(tokens.tokens, expected.cpu())
    images = N["DSJanusVQDecode"]().decode(pro, tokens)[0]
    assert images.shape == (2, 384, 384, 3) and images.dtype == torch.float32
    assert images.device.type == "cpu" and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, decode_image_tokens(pro.model, expected))


def load_image_like_comfyui() -> torch.Tensor:
    """IMAGE [1, 200, 300, 3] as ComfyUI's Load Image gives it."""
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(IMAGE_PATH).convert("RGB"))).float().div(255)[None]


def test_instruction_editing_chain(pro):
    image = load_image_like_comfyui()
    prompt = N["DSJanusPromptEncoder"]().encode(pro, "Make the sky purple.")[0]
    pair = N["DSJanusCFGPair"]().build(pro, prompt, 2, None, image)[0]
    assert pair.is_edit and pair.num_rows == 3
    tokens = N["DSJanusARSampler"]().sample(pro, pair, 5, 5.0, 1.0, 0, 1.0, 3.0)[0]
    expected = generate_image_tokens(pro.model, "Make the sky purple.", 2, seed=5, image=image, image_cfg_weight=3.0)
    assert torch.equal(tokens.tokens, expected.cpu()) and tokens.image_size == (384, 384)


def test_vq_encode_and_inpaint_chain(pro):
    from janus_core.image_tokens import encode_image_tokens, pixel_mask_to_tokens

    image = load_image_like_comfyui()
    encoded = N["DSJanusVQEncode"]().encode(pro, image)[0]
    assert torch.equal(encoded.tokens, encode_image_tokens(pro.model, image))
    assert encoded.image_size == (200, 300) and encoded.model_folder == str(pro.model.folder)
    mask = torch.zeros(1, 200, 300)
    mask[:, 50:120, 100:220] = 1.0  # Load Image's MASK: 1 where the picture is transparent = regenerate
    prompt = N["DSJanusPromptEncoder"]().encode(pro, "A moon.")[0]
    pair = N["DSJanusCFGPair"]().build(pro, prompt, 2)[0]
    tokens = N["DSJanusARSampler"]().sample(pro, pair, 8, 5.0, 1.0, 0, 1.0, 5.0, encoded, mask)[0].tokens
    resample = pixel_mask_to_tokens(pro.model, mask).reshape(1, 576)
    expected = generate_image_tokens(pro.model, pair, seed=8, init_tokens=encoded.tokens, mask=resample)
    assert torch.equal(tokens, expected.cpu())
    keep = ~resample.expand(2, -1)
    assert torch.equal(tokens[keep], encoded.tokens.expand(2, -1)[keep]) and not torch.equal(tokens[0], tokens[1])


def test_image_input_errors(pro, flow):
    from nodes.text_to_image import ImageTokens

    image = load_image_like_comfyui()
    sampler, pair = N["DSJanusARSampler"](), build_cfg_pair(pro.model, "a cat", 1)
    encoded = N["DSJanusVQEncode"]().encode(pro, image)[0]
    with pytest.raises(JanusError, match="VQ encoding needs a Janus / Janus-Pro model"):
        N["DSJanusVQEncode"]().encode(flow, image)
    with pytest.raises(JanusError, match=r"expected \[B, H, W, 3\]"):
        N["DSJanusVQEncode"]().encode(pro, image[0])
    flow_prompt = N["DSJanusPromptEncoder"]().encode(flow, "Make it red.")[0]
    with pytest.raises(JanusError, match="Instruction editing .* needs a Janus / Janus-Pro model"):
        N["DSJanusCFGPair"]().build(flow, flow_prompt, 1, None, image)
    with pytest.raises(JanusError, match="The mask needs init_tokens"):
        sampler.sample(pro, pair, 0, 5.0, 1.0, 0, 1.0, 5.0, None, torch.ones(1, 200, 300))
    with pytest.raises(JanusError, match="init_tokens need a MASK"):
        sampler.sample(pro, pair, 0, 5.0, 1.0, 0, 1.0, 5.0, encoded)
    with pytest.raises(JanusError, match="mask is 64x64 pixels but the init tokens stand for a 300x200 image"):
        sampler.sample(pro, pair, 0, 5.0, 1.0, 0, 1.0, 5.0, encoded, torch.zeros(1, 64, 64))
    foreign = ImageTokens(encoded.tokens, encoded.grid, "/somewhere/Janus-Pro-7B", encoded.image_size)
    with pytest.raises(JanusError, match="init tokens come from /somewhere/Janus-Pro-7B"):
        sampler.sample(pro, pair, 0, 5.0, 1.0, 0, 1.0, 5.0, foreign, torch.ones(1, 200, 300))
    two = N["DSJanusVQEncode"]().encode(pro, torch.cat([image, image, image]))[0]
    with pytest.raises(JanusError, match="init_tokens holds 3 rows for a batch of 1"):
        sampler.sample(pro, pair, 0, 5.0, 1.0, 0, 1.0, 5.0, two, torch.ones(1, 200, 300))


def test_flow_sampler_outputs_unscaled_sdxl_latent(flow):
    prompt = N["DSJanusPromptEncoder"]().encode(flow, "Sunset over the sea.")[0]
    pair = N["DSJanusCFGPair"]().build(flow, prompt, 2)[0]
    latent = N["DSJanusFlowSampler"]().sample(flow, pair, 3, 4, 2.0)[0]
    z = generate_flow_latents(flow.model, pair, seed=3, steps=4, cfg_weight=2.0)
    assert latent["samples"].shape == (2, 4, 48, 48)
    torch.testing.assert_close(latent["samples"], latent_to_sdxl_vae(z))


def test_understanding_node(pro):
    import numpy as np
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(IMAGE_PATH).convert("RGB"))).float().div(255)
    batch = torch.stack([pixels, pixels.flip(1)])
    out = N["DSJanusUnderstand"]().answer(pro, batch, "Describe this image.", "per image", 8, 0.0, 0.95, 0)
    assert len(out["result"][0]) == 2 and out["ui"]["text"] == out["result"][0]
    together = N["DSJanusUnderstand"]().answer(pro, batch, "Compare.", "all images in one question", 8, 0.0, 0.95, 0)
    assert len(together["result"][0]) == 1


def test_wrong_model_kind_errors(pro, flow):
    flow_prompt = N["DSJanusPromptEncoder"]().encode(flow, "a cat")[0]
    flow_pair = N["DSJanusCFGPair"]().build(flow, flow_prompt, 1)[0]
    with pytest.raises(JanusError, match="JanusFlow"):
        N["DSJanusARSampler"]().sample(pro, flow_pair, 0, 5.0, 1.0, 0, 1.0)
    pro_pair = N["DSJanusCFGPair"]().build(pro, N["DSJanusPromptEncoder"]().encode(pro, "a cat")[0], 1)[0]
    with pytest.raises(JanusError, match="Janus-Pro"):
        N["DSJanusFlowSampler"]().sample(flow, pro_pair, 0, 2, 2.0)
    with pytest.raises(JanusError, match="another model"):
        N["DSJanusCFGPair"]().build(pro, flow_prompt, 1)
    with pytest.raises(JanusError, match="batch_size"):
        N["DSJanusCFGPair"]().build(pro, N["DSJanusPromptEncoder"]().encode(pro, "a cat")[0], 0)


def test_pack_root_imports_as_a_package_without_comfyui():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ComfyUI_Janus', r'{root / '__init__.py'}', "
        f"submodule_search_locations=[r'{root}'])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['ComfyUI_Janus'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert len(mod.NODE_CLASS_MAPPINGS) == 8 and 'comfy' not in sys.modules\n"
        "import os; web = os.path.join(os.path.dirname(mod.__file__), mod.WEB_DIRECTORY)\n"
        "assert os.path.isfile(os.path.join(web, 'janus_show_text.js')), web\n"
        "assert 'transformers' not in sys.modules, 'import must stay light'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_nodes_run_under_inference_mode_like_comfyui(pro, flow):
    """ComfyUI executes nodes inside torch.inference_mode(); every sampler must work there too."""
    with torch.inference_mode():
        prompt = N["DSJanusPromptEncoder"]().encode(pro, "A red cube.")[0]
        pair = N["DSJanusCFGPair"]().build(pro, prompt, 2)[0]
        tokens = N["DSJanusARSampler"]().sample(pro, pair, 1, 5.0, 1.0, 0, 1.0)[0]
        assert N["DSJanusVQDecode"]().decode(pro, tokens)[0].shape == (2, 384, 384, 3)
        flow_prompt = N["DSJanusPromptEncoder"]().encode(flow, "Sunset.")[0]
        flow_pair = N["DSJanusCFGPair"]().build(flow, flow_prompt, 2)[0]
        assert N["DSJanusFlowSampler"]().sample(flow, flow_pair, 0, 2, 2.0)[0]["samples"].shape == (2, 4, 48, 48)
        image = torch.rand(2, 40, 60, 3)
        out = N["DSJanusUnderstand"]().answer(pro, image, "Describe.", "per image", 4, 0.0, 0.95, 0)
        assert len(out["result"][0]) == 2


def test_an_empty_prompt_encoder_means_no_negative_prompt(pro, flow):
    """ComfyUI users leave the negative encoder empty: that is the pair without a negative prompt, for both
    kinds of model; an empty positive prompt is refused with what to do."""
    encode, build = N["DSJanusPromptEncoder"]().encode, N["DSJanusCFGPair"]().build
    for handle in (pro, flow):
        prompt, empty = encode(handle, "A red cube.")[0], encode(handle, " \n")[0]
        with_empty, without = build(handle, prompt, 2, empty)[0], build(handle, prompt, 2)[0]
        assert vars(with_empty).keys() == vars(without).keys()
        for key, value in vars(without).items():
            other = vars(with_empty)[key]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key
        with pytest.raises(JanusError, match="The prompt is empty; describe the image you want"):
            build(handle, empty, 1)


def test_flow_pair_refuses_prompts_of_another_model(pro, flow):
    pro_prompt = N["DSJanusPromptEncoder"]().encode(pro, "a cat")[0]
    flow_prompt = N["DSJanusPromptEncoder"]().encode(flow, "a cat")[0]
    with pytest.raises(JanusError, match="prompt was built for another model"):
        N["DSJanusCFGPair"]().build(flow, pro_prompt, 1)
    with pytest.raises(JanusError, match="negative prompt was built for another model"):
        N["DSJanusCFGPair"]().build(flow, flow_prompt, 1, pro_prompt)
