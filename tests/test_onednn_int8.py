"""The oneDNN int8 kernel (janus_core.quant.onednn_int8): the exact two-term split of the activations, the kernel
against the reference where its self-check passes (x86 CPUs with VNNI or AMX), the refusal where oneDNN saturates,
and the stand-in / unpacking of layers laid out for it."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import janus_core
from janus_core.errors import JanusError
from janus_core.quant import formats, kernels, onednn_int8
from janus_core.quant.kernels import ONEDNN_INT8, ONEDNN_KERNEL, PLAIN, kernel_for
from janus_core.quant.linear import QuantLinear, quant_layers
from tests.conftest import PRO_TINY, teacher_forced_cfg_logits

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def _chosen() -> str | None:
    """The stock int8 kernel this CPU gets (the AVX512-BF16 one, tried first where it can be built, turned off)."""
    with kernels.stock_kernels():
        kernel = kernel_for(CPU, "int8", torch.bfloat16).kernel
    return kernel.name if kernel else None


# Whether this CPU runs the kernel (its self-check passes: VNNI or AMX); the tests that need it say so.
ONEDNN_USED = _chosen() == ONEDNN_KERNEL
needs_kernel = pytest.mark.skipif(not ONEDNN_USED, reason="oneDNN's int8 GEMM is not right on this CPU (no VNNI/AMX)")
X86 = platform.machine().lower() in ("x86_64", "amd64")


pytestmark = pytest.mark.usefixtures("fresh_kernel_choices", "stock_kernels")


def test_split_rows_reconstruct_within_a_64516th_of_their_peak():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 512, generator=gen)
    x[:, 7] *= 300.0  # an outlier channel, as LLM hidden states have
    x[3] = 0.0
    x[4] = -2.5
    terms, scale = onednn_int8.split_rows(x)
    assert terms.dtype == torch.uint8 and terms.shape == (10, 512) and scale.shape == (5, 1)
    a, b = terms[:5].float() - 128, terms[5:].float() - 128
    assert a.abs().max() <= 127 and b.abs().max() <= 127
    back = scale * (a + b / 254)
    peak = x.abs().amax(dim=1, keepdim=True)
    assert torch.all((back - x).abs() <= peak / 64516 * 1.001)
    assert torch.equal(back[3], x[3]) and torch.allclose(back[4], x[4], rtol=1e-6)


def test_split_rows_leave_their_input_alone():
    x = torch.randn(2, 64)
    before = x.clone()
    onednn_int8.split_rows(x)
    assert torch.equal(x, before)


@pytest.mark.skipif(not onednn_int8.available(), reason="this torch has no oneDNN int8 ops")
def test_pack_and_unpack_round_trip_exactly():
    qweight, qscale = formats.quantize(torch.randn(96, 192), "int8")
    packed = onednn_int8.pack(qweight, qscale)
    assert torch.equal(onednn_int8.unpack(packed), qweight)
    assert packed.scale.dtype == torch.float32 and torch.equal(packed.scale, qscale.float())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_kernel_equals_the_dequantized_matmul_in_float32(rows):
    """The split keeps the activations to 1/64516 of their row's peak: closer than rounding them to bf16 would."""
    gen = torch.Generator().manual_seed(rows)
    qweight, qscale = formats.quantize(torch.randn(160, 384, generator=gen) * 0.02, "int8")
    x = torch.randn(rows, 384, generator=gen)
    x[:, 5] *= 50.0
    got = onednn_int8.matmul(x, onednn_int8.pack(qweight, qscale))
    weight = formats.dequantize(qweight, qscale, "int8").double()
    expect = x.double() @ weight.t()
    bf16_activations = x.bfloat16().double() @ weight.t()
    assert got.dtype == torch.float32 and got.shape == (rows, 160)
    error = float((got.double() - expect).abs().max() / expect.abs().max())
    assert error < 3e-4 and error < 0.5 * float((bf16_activations - expect).abs().max() / expect.abs().max())


@pytest.mark.skipif(not (X86 and onednn_int8._ops()), reason="needs an x86 CPU and oneDNN's int8 ops")
def test_kernel_is_refused_when_onednn_is_limited_to_avx2():
    """Without VNNI oneDNN adds byte products in saturating 16 bits. ONEDNN_MAX_CPU_ISA=AVX2 gives that code path on
    any x86 CPU: the capability check refuses the kernel, and its self-check would refuse it too."""
    code = ("import logging, torch\nlogging.basicConfig(level=logging.INFO)\n"
            "from janus_core.quant import kernels\n"
            "print(kernels.kernel_for(torch.device('cpu'), 'int8', torch.bfloat16).reason)\n"
            "kernels.onednn_int8.unavailable_reason = lambda: None  # as if the CPU check were wrong\n"
            "onednn = next(k for k in kernels.KERNELS if k.name == kernels.ONEDNN_KERNEL)\n"
            "print(kernels._self_check(onednn, torch.device('cpu'), torch.bfloat16))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    reason, self_check = done.stdout.strip().splitlines()
    assert not reason.startswith(ONEDNN_KERNEL) and f"{ONEDNN_KERNEL} needs an x86 CPU with VNNI or AMX" in reason
    assert "deviates" in self_check


@needs_kernel
def test_layers_hold_stand_ins_and_unpack_to_the_canonical_values():
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int8")
    canonical = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int8",
                                      compute_device="meta")  # never laid out for a kernel
    layers, plain = quant_layers(model.net), quant_layers(canonical.net)
    linear = {n: m for n, m in layers.items() if isinstance(m, QuantLinear)}
    assert linear and {m.layout for m in linear.values()} == {ONEDNN_INT8}
    for name, layer in linear.items():
        assert layer.qweight.shape == plain[name].qweight.shape and layer.qweight.dtype == torch.int8
        assert all(s == 0 for s in layer.qweight.stride())  # no memory behind the state-dict entry
        layer.unpack()
        assert layer.layout == PLAIN and layer.packed is None
        assert torch.equal(layer.qweight, plain[name].qweight)


@needs_kernel
def test_moving_the_model_unpacks_first():
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int8")
    layers = [m for m in quant_layers(model.net).values() if isinstance(m, QuantLinear)]
    seen = []
    real_to = model.net.to

    def recording_to(device):
        seen.append({m.layout for m in layers})
        return real_to(device)

    model.net.to = recording_to
    model.to("meta")
    assert seen == [{PLAIN}]
    assert all(m.qweight.device.type == "meta" and m.packed is None for m in layers)


@needs_kernel
def test_parameters_moved_behind_the_models_back_are_recovered():
    """ComfyUI moves parameters itself: the stand-in arrives, the values are still in the packed weight."""
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int8")
    model.net.to("meta")
    model.pack_projections()  # what the ComfyUI handle does after a load
    layers = [m for m in quant_layers(model.net).values() if isinstance(m, QuantLinear)]
    assert all(m.layout == PLAIN and m.packed is None and m.qweight.device.type == "meta" for m in layers)


@needs_kernel
def test_float32_model_gives_the_dequantized_logits(monkeypatch):
    with_kernel = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize="int8")
    assert {m.layout for m in quant_layers(with_kernel.net).values() if isinstance(m, QuantLinear)} == {ONEDNN_INT8}
    got = teacher_forced_cfg_logits(with_kernel)
    kernels._CHOICES.clear()
    monkeypatch.setattr(onednn_int8, "available", lambda: False)
    without = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize="int8")
    assert {m.layout for m in quant_layers(without.net).values()} == {PLAIN}
    expect = teacher_forced_cfg_logits(without)
    # the split's error (1/64516 of each row's peak) through every layer and cfg 5: measured 2.3e-4
    assert float(((got - expect).norm(dim=-1) / expect.norm(dim=-1)).max()) < 1e-3


@needs_kernel
def test_non_finite_activations_stay_non_finite_in_their_row_only():
    """An overflow upstream must not turn into finite garbage (bytes cannot hold inf / NaN; the row scale does)."""
    qweight, qscale = formats.quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.02, "int8")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    x[0, 5], x[1, 7] = float("inf"), float("nan")
    got = onednn_int8.matmul(x, onednn_int8.pack(qweight, qscale))
    assert not torch.isfinite(got[0]).all() and not torch.isfinite(got[1]).all()
    expect = x[2:].double() @ formats.dequantize(qweight, qscale, "int8").double().t()
    assert float((got[2:].double() - expect).abs().max() / expect.abs().max()) < 1e-3


def test_a_torch_without_the_ops_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(onednn_int8, "_ops", lambda: None)
    assert onednn_int8.unavailable_reason() == "is not in this torch"
    qweight, qscale = formats.quantize(torch.randn(8, 32), "int8")
    with pytest.raises(JanusError, match="no oneDNN int8 GEMM.*available"):
        onednn_int8.pack(qweight, qscale)
