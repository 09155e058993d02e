"""Janus-Pro text-to-image against the reference goldens (teacher-forced logits, greedy tokens, VQ decode)."""

import pytest
import torch

import janus_core
from janus_core.errors import JanusError
from janus_core.generate_ar import (
    build_cfg_pair,
    cfg_logit_steps,
    decode_image_tokens,
    generate_image_tokens,
)
from janus_core.images import to_uint8
from janus_core.prompts import encode_prompt
from janus_core.sampling import cfg_mix
from tests.conftest import FLOW_TINY, PRO_TINY, close, golden

INTERLEAVED_TO_BLOCK = [0, 2, 1, 3]  # reference rows c0,u0,c1,u1 -> ours c0,c1,u0,u1


@pytest.fixture(scope="module")
def model():
    return janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    import json

    return json.loads((PRO_TINY / "golden" / "prompts.json").read_text(encoding="utf-8"))


def test_prompt_strings_and_ids(model, prompts):
    for entry in prompts["prompts"]:
        tokens = encode_prompt(model, entry["prompt"])
        assert tokens.prompt_string == entry["prompt_string"]
        assert tokens.ids.tolist() == entry["input_ids"]


def test_janus_1p3b_roles_when_forced(prompts):
    m = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, variant="janus-1.3b")
    entry = prompts["prompts"][0]
    tokens = encode_prompt(m, entry["prompt"])
    assert tokens.prompt_string == entry["janus_1p3b_style"]["prompt_string"]
    assert tokens.ids.tolist() == entry["janus_1p3b_style"]["input_ids"]


def test_cfg_rows_match_reference(model, prompts):
    for entry in prompts["prompts"]:
        pair = build_cfg_pair(model, entry["prompt"], batch_size=2)
        rows = entry["cfg_rows_parallel2"]
        assert pair.cond_ids.tolist() == rows[0] == rows[2]
        assert pair.uncond_ids.tolist() == rows[1] == rows[3]


def test_teacher_forced_logits(model):
    g = golden(PRO_TINY, "ar_teacher_forced")
    prompt = janus_core.generate_ar.PromptTokens("", "", g["input_ids"], model.variant, str(model.folder))
    pair = build_cfg_pair(model, prompt, batch_size=2)
    assert pair.cond_ids.tolist() == g["cfg_rows"][0].tolist()
    assert pair.uncond_ids.tolist() == g["cfg_rows"][1].tolist()
    forced = g["forced_tokens"]
    steps = cfg_logit_steps(model, pair)
    hidden, out = next(steps)
    for s in range(forced.shape[1]):
        close(hidden, g["last_hidden"][s][INTERLEAVED_TO_BLOCK])
        close(out[:2], g["cond_logits"][s])
        close(out[2:], g["uncond_logits"][s])
        close(cfg_mix(out[:2], out[2:], 5.0), g["cfg_logits"][s])
        hidden, out = steps.send(forced[:, s])
    steps.close()


def test_prefill_hidden(model):
    g = golden(PRO_TINY, "ar_teacher_forced")
    from janus_core.llm import KVCache

    rows = g["cfg_rows"].long()
    cache = KVCache.allocate(model.llm, rows.shape[0], rows.shape[1])
    hidden = model.llm.forward(model.llm.embed(rows), cache)
    close(hidden, g["prefill_hidden"])


def test_greedy_parity(model):
    g = golden(PRO_TINY, "ar_greedy_p1")
    prompt = janus_core.generate_ar.PromptTokens("", "", g["input_ids"], model.variant, str(model.folder))
    tokens = generate_image_tokens(model, build_cfg_pair(model, prompt, 2), top_k=1, cfg_weight=5.0)
    expected = g["tokens"].long()
    mismatch = (tokens != expected).nonzero()
    if mismatch.numel():
        first = mismatch[0, 1].item()
        margin = g["cfg_margin"][first].min().item()
        assert margin < 1e-3, f"token {first} differs although the reference margin was {margin}"
    else:
        images = decode_image_tokens(model, tokens)
        assert images.shape == (2, 384, 384, 3) and images.dtype == torch.float32
        diff = (to_uint8(images).int() - g["images"].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_vq_decode(model):
    g = golden(PRO_TINY, "vq_decode")
    decoded = model.net.gen_vision_model.decode_code(g["codes"], (24, 24))
    close(decoded, g["decoded"])
    close(model.net.image_token_embeds(g["codes"][:, :16]), g["gen_img_embeds_first16"])
    images = decode_image_tokens(model, g["codes"])
    close(images, ((g["decoded"].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1))


def test_flow_model_rejected():
    flow = janus_core.load_model(FLOW_TINY, device="cpu", dtype=torch.float32)
    with pytest.raises(JanusError, match="flow sampler"):
        generate_image_tokens(flow, "a cat")


def _forced_rows(model, pair, forced: torch.Tensor) -> list[torch.Tensor]:
    steps = cfg_logit_steps(model, pair)
    _, out = next(steps)
    outs = [out]
    for s in range(forced.shape[1]):
        _, out = steps.send(forced[:, s])
        outs.append(out)
    steps.close()
    return outs


def test_negative_prompt_rows_are_padded_and_masked_exactly(model):
    short, long = "A cat.", "A very long negative prompt about blurry, noisy, low quality pictures."
    forced = torch.randint(0, 4096, (1, 6), generator=torch.Generator().manual_seed(0))
    mixed = _forced_rows(model, build_cfg_pair(model, short, 1, long), forced)
    alone_short = _forced_rows(model, build_cfg_pair(model, short, 1), forced)
    alone_long = _forced_rows(model, build_cfg_pair(model, long, 1), forced)
    for m, s, lg in zip(mixed, alone_short, alone_long, strict=True):
        close(m[0], s[0], rtol=1e-5)  # the shorter cond row is left-padded: same logits as alone
        close(m[1], lg[0], rtol=1e-5)  # the negative row is the long prompt's cond row


def test_negative_prompt_changes_the_image(model):
    a = generate_image_tokens(model, "A red cube.", top_k=1)
    b = generate_image_tokens(model, "A red cube.", top_k=1, negative_prompt="a blue sphere")
    assert not torch.equal(a, b)


def test_seeds_are_reproducible_and_per_image(model):
    batch = generate_image_tokens(model, "A red cube.", batch_size=3, seed=11)
    again = generate_image_tokens(model, "A red cube.", batch_size=3, seed=11)
    assert torch.equal(batch, again)
    assert len({tuple(r.tolist()) for r in batch}) == 3
    for i in range(3):
        alone = generate_image_tokens(model, "A red cube.", batch_size=1, seed=11 + i)
        assert torch.equal(alone[0], batch[i])


def test_sampling_filters_change_output(model):
    base = generate_image_tokens(model, "A red cube.", seed=1)
    assert not torch.equal(base, generate_image_tokens(model, "A red cube.", seed=1, top_k=5))
    assert not torch.equal(base, generate_image_tokens(model, "A red cube.", seed=1, top_p=0.5))


def test_callback_reports_progress_and_can_cancel(model):
    seen = []

    class Cancelled(Exception):
        pass

    def callback(step, total, tokens):
        seen.append((step, total, tokens.shape[1]))
        if step == 9:
            raise Cancelled

    with pytest.raises(Cancelled):
        generate_image_tokens(model, "A red cube.", callback=callback)
    assert seen[0] == (0, 576, 1) and seen[-1] == (9, 576, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0, "top_k": 1}, "temperature must be > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"prompt": "  "}, "prompt is empty"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    args = {"prompt": "A red cube."} | kwargs
    with pytest.raises(JanusError, match=message):
        generate_image_tokens(model, **args)


def test_prompt_from_another_model_is_rejected(model):
    flow = janus_core.load_model(FLOW_TINY, device="cpu", dtype=torch.float32)
    from janus_core.generate_flow import build_flow_cfg

    with pytest.raises(JanusError, match="another model"):
        generate_image_tokens(model, encode_prompt(janus_core.load_model(PRO_TINY, dtype=torch.float32,
                                                                           variant="janus-1.3b"), "a cat"))
    with pytest.raises(JanusError, match="FlowCFG belongs to a JanusFlow model"):
        generate_image_tokens(model, build_flow_cfg(flow, "a cat"))
