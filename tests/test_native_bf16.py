"""The int4 / int8 kernels built at first use (janus_core/quant/native_bf16.py; AVX512-BF16 and AMX variants): their
layouts, their arithmetic against float32, rows independent of the row count, the build and its cache, when they
are offered, and quantized models running on them."""

import dataclasses
import functools
import logging

import pytest
import torch

import janus_core
from janus_core import precision
from janus_core.errors import JanusError
from janus_core.generate_ar import generate_image_tokens
from janus_core.quant import formats, kernels, native_bf16
from janus_core.quant.kernels import NATIVE_INT4, NATIVE_INT8, kernel_for
from janus_core.quant.linear import quant_layers
from tests.conftest import PRO_TINY, teacher_forced_cfg_logits

CPU = torch.device("cpu")
LAYOUT = {"int4": NATIVE_INT4, "int8": NATIVE_INT8}
MODES = pytest.mark.parametrize("mode", ["int4", "int8"])
# Every kernel of the C file: (variant, mode).
VARIANT_MODES = pytest.mark.parametrize("variant, mode", [
    (native_bf16.AVX512, "int4"), (native_bf16.AMX, "int4"), (native_bf16.AMX, "int8")])

pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")


@pytest.fixture
def kernel(variant, mode):
    """The ``variant``'s matmul, where this machine can build and run it (x86-64 Linux, a C compiler, AVX512-BF16
    for both variants, AMX for the AMX one: an AMX machine tests both)."""
    if variant not in native_bf16.runnable_variants():
        why = native_bf16.unavailable_reason(mode) or "no AMX"
        pytest.skip(f"this machine cannot run the {variant} kernels ({why})")
    return functools.partial(native_bf16.matmul, variant=variant)


@pytest.fixture
def chosen(mode):
    """The kernel this machine's CPU class uses for ``mode``, where there is one."""
    reason = native_bf16.unavailable_reason(mode)
    if reason:
        pytest.skip(f"the built kernels {reason}")
    return native_bf16.matmul


def canonical(mode: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight quantized to the canonical ``mode`` layout: ``(qweight, qscale in bf16)``."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    qweight, qscale = formats.quantize(w, mode)
    return qweight, qscale.bfloat16()


def reference(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, mode: str) -> torch.Tensor:
    return x.double() @ formats.dequantize(qweight, qscale, mode).double().t()


# --- layouts (no kernel needed) -----------------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("n, k", [(32, 64), (96, 256), (4096 + 64, 96)])
def test_pack_and_unpack_round_trip_exactly(mode, n, k):
    qweight, qscale = canonical(mode, n, k)
    packed, scales = native_bf16.pack(qweight, qscale, mode)
    assert packed.shape == (n // 32, k // 2, 32 if mode == "int4" else 64)
    assert packed.dtype == (torch.uint8 if mode == "int4" else torch.int8)
    assert packed.numel() == qweight.numel() and scales.numel() == qscale.numel()
    back_weight, back_scale = native_bf16.unpack(packed, scales, mode)
    assert torch.equal(back_weight, qweight) and torch.equal(back_scale, qscale)


@MODES
def test_layout_is_the_one_the_c_file_reads(mode):
    """Input pair p of block b: int4 byte 2j + e holds q[32b + j, 2p + e] low and q[32b + 16 + j, 2p + e] high;
    int8 byte 2j + e holds q[32b + j, 2p + e] and byte 32 + 2j + e q[32b + 16 + j, 2p + e]."""
    qweight, qscale = canonical(mode, 64, 64)
    packed, scales = native_bf16.pack(qweight, qscale, mode)
    for b, p, j, e in [(0, 0, 0, 0), (1, 5, 7, 1), (1, 31, 15, 0), (0, 17, 3, 1)]:
        if mode == "int4":
            q, byte = formats.int4_values(qweight), int(packed[b, p, 2 * j + e])
            assert byte & 0xF == q[32 * b + j, 2 * p + e] and byte >> 4 == q[32 * b + 16 + j, 2 * p + e]
        else:
            assert packed[b, p, 2 * j + e] == qweight[32 * b + j, 2 * p + e]
            assert packed[b, p, 32 + 2 * j + e] == qweight[32 * b + 16 + j, 2 * p + e]
    if mode == "int4":
        assert torch.equal(scales[1, 0, :, 3], qscale[32 + 3, 0])  # [block, group, (scale, zero), output]


def test_fits_whole_blocks_of_32_outputs_and_inputs_in_32s():
    assert native_bf16.fits("int4", 64, 128) and native_bf16.fits("int8", 32, 96)
    assert not native_bf16.fits("int4", 48, 128) and not native_bf16.fits("int8", 48, 128)
    assert not native_bf16.fits("int8", 64, 80)


# --- arithmetic ---------------------------------------------------------------------------------------------------


@VARIANT_MODES
@pytest.mark.parametrize("n, k", [(32, 64), (192, 256), (96, 384), (64, 96)])
@pytest.mark.parametrize("rows", [1, 2, 6, 7, 12, 13, 16, 17, 32, 33, 64, 65, 150])
def test_kernel_equals_float32_up_to_the_output_rounding(kernel, mode, n, k, rows):
    """Products of bf16 activations and small integers are exact, sums float32: the only visible error is rounding
    the result to bf16 (half a unit in the last place, 2^-9 relative)."""
    qweight, qscale = canonical(mode, n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n)).bfloat16()
    got = kernel(x, *native_bf16.pack(qweight, qscale, mode), mode)
    expect = reference(x, qweight, qscale, mode)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    bound = expect.abs() * 2.0**-8 + 1e-5 * expect.abs().max()
    assert torch.all((got.double() - expect).abs() <= bound)


@VARIANT_MODES
@pytest.mark.parametrize("n", [192, 96], ids=["whole units", "odd last block"])
def test_each_row_is_the_same_whatever_the_row_count(kernel, mode, n):
    """The batch property on these kernels: row i of a 37-row product equals the product of row i alone, bit for
    bit (the register tiles, the buffered and the direct paths do the same additions in the same order)."""
    qweight, qscale = canonical(mode, n, 256)
    packed = native_bf16.pack(qweight, qscale, mode)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    full = kernel(x, *packed, mode)
    for i in range(37):
        assert torch.equal(kernel(x[i:i + 1], *packed, mode), full[i:i + 1])
    assert torch.equal(kernel(x[:13], *packed, mode), full[:13])


@VARIANT_MODES
def test_threads_do_not_change_the_result(kernel, mode):
    qweight, qscale = canonical(mode, 4096, 128)
    packed = native_bf16.pack(qweight, qscale, mode)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x, *packed, mode)
        torch.set_num_threads(2)
        two = kernel(x, *packed, mode)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@VARIANT_MODES
def test_tensors_the_c_code_cannot_take_are_refused(kernel, mode):
    qweight, qscale = canonical(mode, 64, 128)
    packed, scales = native_bf16.pack(qweight, qscale, mode)
    other = "int8" if mode == "int4" else "int4"
    x = torch.randn(2, 128).bfloat16()
    for args in [(x.float(), packed, scales, mode), (x[:, :64], packed, scales, mode),
                 (x, packed, scales.float(), mode), (x, packed[:1], scales, mode), (x, packed, scales, other)]:
        with pytest.raises(JanusError, match="internal: int[48] kernel given"):
            kernel(*args)


# --- when it is offered, the build ---------------------------------------------------------------------------------


NATIVE_CAPS = precision.CpuCaps(model="test", arch="x86_64", capability="AVX512", avx512_bf16=True, onednn_bf16=True,
                                avx512_vnni=True)


@pytest.mark.parametrize("change, env, problem", [
    ({}, {}, None),
    ({"amx_bf16": True}, {}, None),
    ({"avx512_bf16": False}, {}, "needs a CPU with AVX512-BF16"),
    ({"capability": "AVX2"}, {}, "ATEN_CPU_CAPABILITY"),
    ({"arch": "aarch64"}, {}, "Linux on x86-64 only"),
    ({}, {native_bf16.SWITCH: "0"}, "turned off"),
])
def test_offered_on_cpus_with_bf16_dot_products(change, env, problem, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(native_bf16.sys, "platform", "linux")
    found = native_bf16.platform_problem(dataclasses.replace(NATIVE_CAPS, **change))
    assert found is None if problem is None else problem in found


@pytest.fixture
def build_anywhere(monkeypatch, tmp_path):
    """Build into an empty cache as if the CPU qualified (compiling needs no AVX-512; running it would)."""
    monkeypatch.setattr(native_bf16, "platform_problem", lambda caps: None)
    monkeypatch.setenv("JANUS_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_built_once_then_taken_from_the_cache(build_anywhere, monkeypatch):
    if native_bf16._compiler() is None:
        pytest.skip("no C compiler on this machine")
    first = native_bf16._library_path()
    assert first.parent == build_anywhere and first.suffix == ".so" and first.stat().st_size > 0
    assert not list(build_anywhere.glob("*.partial"))
    monkeypatch.setattr(native_bf16, "_build", lambda target: pytest.fail("built again"))
    assert native_bf16._library_path() == first


@pytest.mark.parametrize("compiler, message", [
    ("/nonexistent/cc", "could not run"),
    ("false", "failed"),
])
def test_a_failed_build_is_named_and_the_stock_kernels_serve(build_anywhere, monkeypatch, caplog, compiler, message):
    monkeypatch.setenv("CC", compiler)
    caplog.set_level(logging.INFO)
    reason = native_bf16.unavailable_reason("int4")
    assert reason.startswith("could not be built or loaded") and message in reason
    assert "Install a C compiler" in caplog.text  # a warning: the user loses speed, and can fix it
    assert not list(build_anywhere.glob("*"))  # nothing half-written left in the cache
    for mode in ("int4", "int8"):
        choice = kernel_for(CPU, mode, torch.bfloat16)
        assert choice.layout != LAYOUT[mode] and f"{mode} bf16-dot-product kernel" in choice.reason
        assert message in choice.reason


def test_without_a_compiler_the_reason_says_so(build_anywhere, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native_bf16.shutil, "which", lambda name: None)
    assert "no C compiler found (set CC" in native_bf16.unavailable_reason("int4")


def test_each_cpu_class_runs_its_variant(monkeypatch):
    """native-bf16 CPUs: int4 on the AVX512-BF16 variant, int8 stays with the stock kernels; AMX CPUs: both modes on
    AMX tiles (a fake library stands for the build: the choice, not the C code, is under test)."""
    def fake(*args):
        raise AssertionError("not called")
    for variant, served in [(native_bf16.AVX512, ("int4",)), (native_bf16.AMX, ("int4", "int8"))]:
        functions = {v: {m: fake for m in native_bf16.SYMBOLS[v]} for v in {native_bf16.AVX512, variant}}
        monkeypatch.setattr(native_bf16, "_load", lambda f=functions, v=variant: (native_bf16.Library(f, v), None))
        for mode in ("int4", "int8"):
            assert native_bf16.available(mode) == (mode in served)
        if "int8" not in served:
            reason = native_bf16.unavailable_reason("int8")
            assert reason == "has no int8 kernel for this CPU class (avx512bf16 variant)"
            choice = kernel_for(CPU, "int8", torch.bfloat16)
            assert choice.layout != NATIVE_INT8 and "has no int8 kernel for this CPU class" in choice.reason
            kernels._CHOICES.clear()


def test_this_machine_uses_its_class_variant():
    library, problem = native_bf16._load()
    if library is None:
        pytest.skip(f"the built kernels {problem}")
    amx = precision.bf16_class(precision.local_cpu_caps()) == precision.AMX
    assert library.variant == (native_bf16.AMX if amx else native_bf16.AVX512)
    expect = {native_bf16.AVX512, native_bf16.AMX} if amx else {native_bf16.AVX512}
    assert set(native_bf16.runnable_variants()) == expect


def test_amx_state_refused_is_named(build_anywhere, monkeypatch, caplog):
    """An AMX CPU whose Linux does not grant AMX state (or a compiler without AMX) keeps the stock kernels and
    says why, rather than faulting on the first tile instruction."""
    if native_bf16._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(native_bf16.precision, "bf16_class", lambda caps: precision.AMX)
    monkeypatch.setattr(native_bf16, "_amx_problem", lambda library: "Linux did not grant this process AMX state")
    caplog.set_level(logging.WARNING)
    assert native_bf16.unavailable_reason("int4") == "cannot use AMX: Linux did not grant this process AMX state"
    assert "the stock kernels serve instead" in caplog.text


@MODES
def test_a_wrong_kernel_fails_its_self_check(chosen, mode, monkeypatch):
    monkeypatch.setattr(native_bf16, "matmul", lambda x, packed, scales, mode: chosen(x, packed, scales, mode) * 2)
    choice = kernel_for(CPU, mode, torch.bfloat16)
    assert choice.layout != LAYOUT[mode] and "(built here) failed its self-check" in choice.reason


# --- a quantized model --------------------------------------------------------------------------------------------


@MODES
def test_model_runs_on_them_and_agrees_with_the_stock_kernel(chosen, mode, monkeypatch):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize=mode)
    layouts = {m.layout for m in quant_layers(model.net).values()}
    assert LAYOUT[mode] in layouts
    logits = teacher_forced_cfg_logits(model)
    tokens = generate_image_tokens(model, "a cat", seed=1, batch_size=3)
    for i in range(3):  # the batch property: image i is the batch of one with seed + i
        assert torch.equal(tokens[i:i + 1], generate_image_tokens(model, "a cat", seed=1 + i))

    monkeypatch.setenv(native_bf16.SWITCH, "0")
    kernels.forget_choices()
    other = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize=mode)
    assert LAYOUT[mode] not in {m.layout for m in quant_layers(other.net).values()}
    other_logits = teacher_forced_cfg_logits(other)
    # both round their bf16 results (torch's int4 kernel dequantizes the weights to bf16 first)
    assert float((logits.float() - other_logits.float()).norm() / other_logits.float().norm()) < 0.03


@MODES
def test_unpack_gives_the_canonical_weights_back(chosen, mode):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize=mode)
    layer = model.net.language_model.model.layers[0].mlp.gate_up_proj
    assert layer.layout == LAYOUT[mode]
    plain = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize=mode)
    expect = plain.net.language_model.model.layers[0].mlp.gate_up_proj
    expect.unpack()  # float32 int8 runs oneDNN's GEMM, whose prepacked weight is opaque
    packed = layer.qweight.data.clone()
    layer.unpack()
    assert layer.layout == "plain" and torch.equal(layer.qweight, expect.qweight)
    assert torch.equal(layer.qscale, expect.qscale.bfloat16())
    model.pack_projections()  # what a move back to the CPU does
    assert layer.layout == LAYOUT[mode] and torch.equal(layer.qweight, packed)
