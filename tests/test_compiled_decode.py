"""The torch.compile'd decode step gives the eager results (tiny fixture, a few steps; speed is never asserted)."""

import logging
import shutil

import pytest
import torch

import janus_core
from janus_core.generate_ar import build_cfg_pair, cfg_logit_steps
from janus_core.llm import COMPILE_ENV, LlamaRunner
from tests.conftest import PRO_TINY

STEPS = 4
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.fixture()
def model():
    return janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)


def trace(model, pair, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden, gen-head logits) after the prefill and after feeding each row of ``tokens [STEPS, B]``."""
    steps = cfg_logit_steps(model, pair)
    out = [next(steps)]
    for chosen in tokens:
        out.append(steps.send(chosen))
    steps.close()
    return out


def assert_same(a: list, b: list) -> None:
    for (ha, la), (hb, lb) in zip(a, b, strict=True):
        torch.testing.assert_close(hb, ha, rtol=1e-4, atol=1e-4 * ha.abs().max().item())
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4 * la.abs().max().item())


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch._inductor
@pytest.mark.parametrize("negative", [None, "blurry, low quality, watermark, text"])
def test_compiled_steps_match_eager(model, negative):
    # The negative prompt has another length than the prompt: the cache then carries a padding mask.
    pair = build_cfg_pair(model, "A red cube on a wooden table.", batch_size=2, negative_prompt=negative)
    tokens = torch.randint(0, model.config.vq.codebook_size, (STEPS, 2), generator=torch.Generator().manual_seed(0))
    eager = trace(model, pair, tokens)
    model.llm.compile = True
    compiled = trace(model, pair, tokens)
    assert model.llm.compile, "compiling the decode step failed (see the logged warning)"
    assert_same(eager, compiled)


def test_compile_failure_falls_back_to_eager(model, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no working compiler")
        return run

    pair = build_cfg_pair(model, "A red cube.", batch_size=1)
    tokens = torch.zeros(2, 1, dtype=torch.long)
    eager = trace(model, pair, tokens)
    monkeypatch.setattr(torch, "compile", broken_compile)
    model.llm.compile = True
    with caplog.at_level(logging.WARNING, logger="janus_core.llm"):
        fallback = trace(model, pair, tokens)
    assert not model.llm.compile
    assert "running eagerly" in caplog.text and "no working compiler" in caplog.text
    assert_same(eager, fallback)


def test_environment_switch(model, monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert LlamaRunner(model.net.language_model, model.config.llm).compile
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not LlamaRunner(model.net.language_model, model.config.llm).compile
    assert LlamaRunner(model.net.language_model, model.config.llm, compile=True).compile
