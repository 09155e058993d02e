"""The runner's fast kernels equal the plain Llama formulas, and the bf16 path agrees with float32."""

import pytest
import torch
import torch.nn.functional as F

import janus_core
from janus_core.generate_ar import build_cfg_pair, cfg_logit_steps
from janus_core.llm import SMALL_ROWS, RotaryTable, apply_rope, linear, rms_norm
from tests.conftest import PRO_TINY


def plain_rms_norm(x, weight, eps):
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def plain_rope(x, positions, head_dim, theta=10000.0):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(positions.float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos().to(x.dtype)[None, :, None], emb.sin().to(x.dtype)[None, :, None]
    half = head_dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).mul(4).to(dtype)
    w = torch.rand(64).add(0.5).to(dtype)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(rms_norm(x, w, 1e-6), plain_rms_norm(x, w, 1e-6), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_bit_identical(dtype):
    x = torch.randn(2, 7, 3, 16, dtype=dtype)
    positions = torch.arange(5, 12)
    cos, sin = RotaryTable(16, 10000.0, 64, dtype, torch.device("cpu"))(positions)
    strided = torch.randn(2, 7, 16, 3, dtype=dtype).transpose(-1, -2)  # non-contiguous input
    assert torch.equal(apply_rope(x, cos, sin), plain_rope(x, positions, 16))
    assert torch.equal(apply_rope(strided, cos, sin), plain_rope(strided, positions, 16))
    assert apply_rope(strided, cos, sin).is_contiguous()


@pytest.mark.parametrize("rows", [1, 2, 32, SMALL_ROWS + 1])
def test_linear_bf16_operand_order(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 96, generator=gen).to(torch.bfloat16)
    w = torch.randn(40, 96, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(linear(x, w).float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=5e-2)


def test_bf16_logits_follow_float32():
    """bf16 runs the few-rows matmul path; its teacher-forced logits stay close to float32's."""
    full = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    half = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    tokens = torch.randint(0, full.config.vq.codebook_size, (3, 2), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (full, half):
        steps = cfg_logit_steps(model, build_cfg_pair(model, "A red cube.", batch_size=2))
        logits = [next(steps)[1]] + [steps.send(t)[1] for t in tokens]
        steps.close()
        results.append(torch.stack(logits).float())
    ref, got = results
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-2 * ref.abs().max().item())
