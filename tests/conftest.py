"""Shared pytest fixtures: paths of the tiny checkpoints and their goldens."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
PRO_TINY = FIXTURES / "janus-pro-tiny"
FLOW_TINY = FIXTURES / "janusflow-tiny"
IMAGE_PATH = FIXTURES / "images" / "synthetic_200x300.png"


@pytest.fixture(scope="session", autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)


@pytest.fixture
def fresh_kernel_choices():
    """The quantized-matmul kernel decided afresh before and after the test (tests fake broken or missing
    kernels, or turn the built int4 / int8 ones off)."""
    from janus_core.quant import kernels

    kernels.forget_choices()
    yield
    kernels.forget_choices()


@pytest.fixture
def stock_kernels():
    """Quantized matmuls on the stock kernels (torch's int4 kernel, oneDNN's int8 GEMM): the int4 / int8 ones built
    at first use (tests/test_built_kernels.py) turned off."""
    from janus_core.quant import kernels

    with kernels.stock_kernels():
        yield


@pytest.fixture(scope="module")
def pro():
    """janus-pro-tiny in float32, loaded once per test module (modules may define their own ``pro``)."""
    from janus_core import load_model

    return load_model(PRO_TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def flow():
    """janusflow-tiny in float32, loaded once per test module (modules may define their own ``flow``)."""
    from janus_core import load_model

    return load_model(FLOW_TINY, dtype=torch.float32)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """``actual`` equals ``expected`` within ``rtol``, absolute slack ``rtol`` x the largest expected value."""
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * expected.abs().max().item())


def golden(model_dir: Path, name: str) -> dict:
    """Load ``<model_dir>/golden/<name>.safetensors`` as a dict of tensors."""
    return load_file(str(model_dir / "golden" / f"{name}.safetensors"))


def node_model(folder: Path, dtype: str = "fp32"):
    """The Janus Model Loader node's output for ``folder``, chosen by name as in ComfyUI (its parent folder is
    the registered model folder, through ``JANUS_MODELS_DIR``)."""
    from nodes.loader import DSJanusModelLoader

    with pytest.MonkeyPatch.context() as env:
        env.setenv("JANUS_MODELS_DIR", str(folder.parent))
        return DSJanusModelLoader().load(folder.name, dtype=dtype)[0]


def teacher_forced_cfg_logits(model) -> torch.Tensor:
    """Guided logits ``[40, 2, V]`` at the golden's teacher-forced steps (prompt 0, two images, cfg 5)."""
    from janus_core.generate_ar import PromptTokens, build_cfg_pair, cfg_logit_steps
    from janus_core.sampling import cfg_mix

    g = golden(PRO_TINY, "ar_teacher_forced")
    pair = build_cfg_pair(model, PromptTokens("", "", g["input_ids"], model.variant, str(model.folder)), 2)
    steps = cfg_logit_steps(model, pair)
    _, out = next(steps)
    logits = []
    forced = g["forced_tokens"]
    for s in range(forced.shape[1]):
        logits.append(cfg_mix(out[:2].float(), out[2:].float(), 5.0))
        if s + 1 < forced.shape[1]:
            _, out = steps.send(forced[:, s])
    steps.close()
    return torch.stack(logits)


def teacher_forced_answer_logits(model, image, question: str, answer: torch.Tensor) -> torch.Tensor:
    """Text logits ``[len(answer), V]`` of an understanding answer fed back token by token (the question about
    ``image`` prefilled first), as the understanding goldens' ``step_logits`` were recorded."""
    from janus_core.llm import KVCache
    from janus_core.understanding import understanding_embeds

    embeds, _ = understanding_embeds(model, [image], question)
    cache = KVCache.allocate(model.llm, 1, embeds.shape[0] + len(answer))
    hidden = model.llm.forward(embeds[None], cache)
    logits = [model.llm.lm_logits(hidden[0, -1])]
    for token in answer[:-1]:
        hidden = model.llm.forward(model.llm.embed(token.view(1, 1)), cache)
        logits.append(model.llm.lm_logits(hidden[0, -1]))
    return torch.stack(logits)
