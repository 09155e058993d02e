"""The AVX512-BF16 int4 kernel built at first use (janus_core/quant/native_int4.py): its layout, its arithmetic
against float32, rows independent of the row count, the build and its cache, when it is offered, and a
quantized model running on it."""

import dataclasses
import logging

import pytest
import torch

import janus_core
from janus_core import precision
from janus_core.errors import JanusError
from janus_core.generate_ar import generate_image_tokens
from janus_core.quant import formats, kernels, native_int4
from janus_core.quant.kernels import NATIVE_INT4, kernel_for
from janus_core.quant.linear import quant_layers
from tests.conftest import PRO_TINY, teacher_forced_cfg_logits

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")


@pytest.fixture
def kernel():
    """The kernel's matmul, where this machine can build and run it (x86-64 Linux, AVX512-BF16, a C compiler)."""
    reason = native_int4.unavailable_reason()
    if reason:
        pytest.skip(f"the AVX512-BF16 int4 kernel {reason}")
    return native_int4.matmul


def canonical(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A random weight quantized to canonical int4: ``(qweight, qscale in bf16, group)``."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    qweight, qscale = formats.quantize(w, "int4")
    return qweight, qscale.bfloat16(), formats.group_size("int4", k)


def reference(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor) -> torch.Tensor:
    return x.double() @ formats.dequantize(qweight, qscale, "int4").double().t()


# --- layout (no kernel needed) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(32, 64), (96, 256), (4096 + 64, 96)])
def test_pack_and_unpack_round_trip_exactly(n, k):
    qweight, qscale, _ = canonical(n, k)
    packed, scales = native_int4.pack(qweight, qscale)
    assert packed.shape == (n // 32, k // 2, 32) and packed.dtype == torch.uint8
    assert packed.numel() == qweight.numel() and scales.numel() == qscale.numel()
    back_weight, back_scale = native_int4.unpack(packed, scales)
    assert torch.equal(back_weight, qweight) and torch.equal(back_scale, qscale)


def test_layout_is_the_one_the_c_file_reads():
    """Byte 2j + e of input pair p in block b: q[32b + j, 2p + e] low, q[32b + 16 + j, 2p + e] high."""
    qweight, qscale, group = canonical(64, 64)
    q = formats.int4_values(qweight)
    packed, scales = native_int4.pack(qweight, qscale)
    for b, p, j, e in [(0, 0, 0, 0), (1, 5, 7, 1), (1, 31, 15, 0), (0, 17, 3, 1)]:
        byte = int(packed[b, p, 2 * j + e])
        assert byte & 0xF == q[32 * b + j, 2 * p + e] and byte >> 4 == q[32 * b + 16 + j, 2 * p + e]
    assert torch.equal(scales[1, 0, :, 3], qscale[32 + 3, 0])  # [block, group, (scale, zero), output]


def test_fits_whole_blocks_of_32_outputs_and_groups_up_to_256():
    assert native_int4.fits(64, 128, 128) and native_int4.fits(32, 96, 32)
    assert not native_int4.fits(48, 128, 128)
    assert not native_int4.fits(64, 1024, 512)


# --- arithmetic ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(32, 64), (192, 256), (96, 384), (64, 96)])
@pytest.mark.parametrize("rows", [1, 2, 11, 12, 13, 64, 65, 150])
def test_kernel_equals_float32_up_to_the_output_rounding(kernel, n, k, rows):
    """Products of bf16 activations and 4-bit values are exact, sums float32: the only visible error is rounding
    the result to bf16 (half a unit in the last place, 2^-9 relative)."""
    qweight, qscale, group = canonical(n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n)).bfloat16()
    got = kernel(x, *native_int4.pack(qweight, qscale), group)
    expect = reference(x, qweight, qscale)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    bound = expect.abs() * 2.0**-8 + 1e-5 * expect.abs().max()
    assert torch.all((got.double() - expect).abs() <= bound)


@pytest.mark.parametrize("n", [192, 96], ids=["whole units", "odd last block"])
def test_each_row_is_the_same_whatever_the_row_count(kernel, n):
    """The batch property on this kernel: row i of a 37-row product equals the product of row i alone, bit for bit
    (the register tiles, the buffered and the direct paths do the same additions in the same order)."""
    qweight, qscale, group = canonical(n, 256)
    packed = native_int4.pack(qweight, qscale)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    full = kernel(x, *packed, group)
    for i in range(37):
        assert torch.equal(kernel(x[i:i + 1], *packed, group), full[i:i + 1])
    assert torch.equal(kernel(x[:13], *packed, group), full[:13])


def test_threads_do_not_change_the_result(kernel):
    qweight, qscale, group = canonical(4096, 128)
    packed = native_int4.pack(qweight, qscale)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x, *packed, group)
        torch.set_num_threads(2)
        two = kernel(x, *packed, group)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_tensors_the_c_code_cannot_take_are_refused(kernel):
    qweight, qscale, group = canonical(64, 128)
    packed, scales = native_int4.pack(qweight, qscale)
    x = torch.randn(2, 128).bfloat16()
    for args in [(x.float(), packed, scales), (x[:, :64], packed, scales), (x, packed, scales.float()),
                 (x, packed[:1], scales)]:
        with pytest.raises(JanusError, match="internal: int4 kernel given"):
            kernel(*args, group)


# --- when it is offered, the build ---------------------------------------------------------------------------------


NATIVE_CAPS = precision.CpuCaps(model="test", arch="x86_64", capability="AVX512", avx512_bf16=True, onednn_bf16=True,
                                avx512_vnni=True)


@pytest.mark.parametrize("change, env, problem", [
    ({}, {}, None),
    ({"avx512_bf16": False}, {}, "the CPU lacks AVX512-BF16"),
    ({"amx_bf16": True}, {}, "AMX"),
    ({"capability": "AVX2"}, {}, "ATEN_CPU_CAPABILITY"),
    ({"arch": "aarch64"}, {}, "Linux on x86-64 only"),
    ({}, {native_int4.SWITCH: "0"}, "turned off"),
])
def test_offered_on_native_bf16_cpus_only(change, env, problem, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(native_int4.sys, "platform", "linux")
    found = native_int4.platform_problem(dataclasses.replace(NATIVE_CAPS, **change))
    assert found is None if problem is None else problem in found


@pytest.fixture
def build_anywhere(monkeypatch, tmp_path):
    """Build into an empty cache as if the CPU qualified (compiling needs no AVX-512; running it would)."""
    monkeypatch.setattr(native_int4, "platform_problem", lambda caps: None)
    monkeypatch.setenv("JANUS_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_built_once_then_taken_from_the_cache(build_anywhere, monkeypatch):
    if native_int4._compiler() is None:
        pytest.skip("no C compiler on this machine")
    first = native_int4._library_path()
    assert first.parent == build_anywhere and first.suffix == ".so" and first.stat().st_size > 0
    assert not list(build_anywhere.glob("*.partial"))
    monkeypatch.setattr(native_int4, "_build", lambda target: pytest.fail("built again"))
    assert native_int4._library_path() == first


@pytest.mark.parametrize("compiler, message", [
    ("/nonexistent/cc", "could not run"),
    ("false", "failed"),
])
def test_a_failed_build_is_named_and_torch_kernel_serves(build_anywhere, monkeypatch, caplog, compiler, message):
    monkeypatch.setenv("CC", compiler)
    caplog.set_level(logging.INFO)
    reason = native_int4.unavailable_reason()
    assert reason.startswith("could not be built or loaded") and message in reason
    assert not list(build_anywhere.glob("*"))  # nothing half-written left in the cache
    choice = kernel_for(CPU, "int4", torch.bfloat16)
    assert choice.layout != NATIVE_INT4 and "AVX512-BF16 int4 kernel" in choice.reason and message in choice.reason


def test_without_a_compiler_the_reason_says_so(build_anywhere, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native_int4.shutil, "which", lambda name: None)
    assert "no C compiler found (set CC" in native_int4.unavailable_reason()


def test_a_wrong_kernel_fails_its_self_check(kernel, monkeypatch):
    monkeypatch.setattr(native_int4, "matmul", lambda x, packed, scales, group: kernel(x, packed, scales, group) * 2)
    choice = kernel_for(CPU, "int4", torch.bfloat16)
    assert choice.layout == kernels.CPU_INT4 and "(built here) failed its self-check" in choice.reason


# --- a quantized model --------------------------------------------------------------------------------------------


def test_int4_model_runs_on_it_and_agrees_with_torchs_kernel(kernel, monkeypatch):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")
    layouts = {m.layout for m in quant_layers(model.net).values()}
    assert NATIVE_INT4 in layouts
    logits = teacher_forced_cfg_logits(model)
    tokens = generate_image_tokens(model, "a cat", seed=1, batch_size=3)
    for i in range(3):  # the batch property: image i is the batch of one with seed + i
        assert torch.equal(tokens[i:i + 1], generate_image_tokens(model, "a cat", seed=1 + i))

    monkeypatch.setenv(native_int4.SWITCH, "0")
    kernels._CHOICES.clear()
    native_int4._load.cache_clear()
    other = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")
    assert NATIVE_INT4 not in {m.layout for m in quant_layers(other.net).values()}
    other_logits = teacher_forced_cfg_logits(other)
    # both round their bf16 results; torch's kernel dequantizes the weights to bf16 first
    assert float((logits.float() - other_logits.float()).norm() / other_logits.float().norm()) < 0.03


def test_unpack_gives_the_canonical_weights_back(kernel):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")
    layer = model.net.language_model.model.layers[0].mlp.gate_up_proj
    assert layer.layout == NATIVE_INT4
    plain = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize="int4")
    expect = plain.net.language_model.model.layers[0].mlp.gate_up_proj
    packed = layer.qweight.data.clone()
    layer.unpack()
    assert layer.layout == "plain" and torch.equal(layer.qweight, expect.qweight)
    assert torch.equal(layer.qscale, expect.qscale.bfloat16())
    model.pack_projections()  # what a move back to the CPU does
    assert layer.layout == NATIVE_INT4 and torch.equal(layer.qweight, packed)
