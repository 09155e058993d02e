"""The runner's fast kernels equal the plain Llama formulas, and the bf16 path agrees with float32."""

import pytest
import torch
import torch.nn.functional as F

import janus_core
from janus_core import precision
from janus_core.generate_ar import build_cfg_pair, cfg_logit_steps
from janus_core.llm import (
    RotaryTable,
    Scratch,
    _attend_rows_fp32,
    _sdpa,
    apply_rope,
    linear,
    rms_norm,
)
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


@pytest.mark.parametrize("cpu_class", [precision.AMX, precision.NATIVE, precision.EMULATED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 17, 32, 300, 1100])
def test_linear_every_form(monkeypatch, cpu_class, dtype, rows):
    """Whatever form the (faked) CPU class picks, the product is F.linear's, in x's dtype, with its shape."""
    monkeypatch.setattr(precision, "local_cpu_class", lambda: cpu_class)
    gen = torch.Generator().manual_seed(rows)
    # more weight rows than one float32 chunk holds, so the chunked form runs several chunks and a partial one
    n = precision.FP32_CHUNK_ELEMENTS // 96 * 2 + 7 if rows == 5 else 40
    x = torch.randn(rows, 1, 96, generator=gen).to(dtype)
    w = torch.randn(n, 96, generator=gen).to(dtype)
    out = linear(x, w)
    assert out.dtype == dtype and out.shape == (rows, 1, n)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), **tol)


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


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention
def test_row_by_row_fp32_attention(masked, kv_heads):
    """The decode-step attention form for CPUs without AMX equals float32 attention over the same cache."""
    gen = torch.Generator().manual_seed(kv_heads)
    b, heads, capacity, end, d = 3, 4, 20, 13, 16
    keys = torch.randn(b, kv_heads, capacity, d, generator=gen).to(torch.bfloat16)
    values = torch.randn(b, kv_heads, capacity, d, generator=gen).to(torch.bfloat16)
    q = torch.randn(b, heads, 1, d, generator=gen).to(torch.bfloat16)
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, end, dtype=torch.bool)
        mask[1, ..., :5] = False  # a left-padded row
    got = _attend_rows_fp32(q, keys, values, end, mask, Scratch())
    ref = _sdpa(q.float(), keys[:, :, :end].float(), values[:, :, :end].float(), mask, False)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=1e-2)
    assert precision.attention_form(torch.bfloat16, 1, "cpu", precision.NATIVE) == precision.FP32_ROWS
