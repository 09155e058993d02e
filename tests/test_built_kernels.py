"""The int4 / int8 kernels built at first use (janus_core/quant/built_kernels.py; AMX, AVX512-BF16, AVX-VNNI and AVX2
variants): their layouts, their arithmetic against float32, rows independent of the row count, the build and its
cache, which variant each CPU gets, and quantized models running on them."""

import dataclasses
import functools
import logging

import pytest
import torch

import janus_core
from janus_core import precision
from janus_core.errors import JanusError
from janus_core.generate_ar import generate_image_tokens
from janus_core.quant import built_kernels, formats, kernels
from janus_core.quant.kernels import BUILT_INT4, BUILT_INT8, kernel_for
from janus_core.quant.linear import quant_layers
from tests.conftest import PRO_TINY, teacher_forced_cfg_logits

CPU = torch.device("cpu")
LAYOUT = {"int4": BUILT_INT4, "int8": BUILT_INT8}
MODES = pytest.mark.parametrize("mode", ["int4", "int8"])
# Every kernel of the C files: (variant, mode).
VARIANT_MODES = pytest.mark.parametrize("variant, mode", [
    (v, m) for v in built_kernels.PREFERENCE for m in ("int4", "int8") if built_kernels.BUILDS[v].symbols.get(m)])
INT16 = (built_kernels.AVX512_VNNI, built_kernels.AVX_VNNI, built_kernels.AVX2)  # the int16_dot_matmul.c builds
INT16_VARIANTS = pytest.mark.parametrize("variant, mode", [
    (v, m) for v in INT16 for m in ("int4", "int8") if built_kernels.BUILDS[v].symbols.get(m)])

pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")


@pytest.fixture
def kernel(variant, mode):
    """The ``variant``'s matmul, where this machine can build and run it (x86-64 Linux, a C compiler, the variant's
    instructions: an AMX machine tests all five, an AVX2 one the AVX2 variant)."""
    if variant not in built_kernels.runnable_variants():
        pytest.skip(f"this machine cannot run the {variant} kernels ({built_kernels._variant(variant)[1]})")
    return functools.partial(built_kernels.matmul, variant=variant)


@pytest.fixture
def chosen(mode):
    """The kernel this machine's CPU class uses for ``mode``, where there is one."""
    reason = built_kernels.unavailable_reason(mode)
    if reason:
        pytest.skip(f"the built kernels {reason}")
    return built_kernels.matmul


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
    packed, scales = built_kernels.pack(qweight, qscale, mode)
    assert packed.shape == (n // 32, k // 2, 32 if mode == "int4" else 64)
    assert packed.dtype == (torch.uint8 if mode == "int4" else torch.int8)
    assert packed.numel() == qweight.numel() and scales.numel() == qscale.numel()
    back_weight, back_scale = built_kernels.unpack(packed, scales, mode)
    assert torch.equal(back_weight, qweight) and torch.equal(back_scale, qscale)


@MODES
def test_layout_is_the_one_the_c_file_reads(mode):
    """Input pair p of block b: int4 byte 2j + e holds q[32b + j, 2p + e] low and q[32b + 16 + j, 2p + e] high;
    int8 byte 2j + e holds q[32b + j, 2p + e] and byte 32 + 2j + e q[32b + 16 + j, 2p + e]."""
    qweight, qscale = canonical(mode, 64, 64)
    packed, scales = built_kernels.pack(qweight, qscale, mode)
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
    assert built_kernels.fits("int4", 64, 128) and built_kernels.fits("int8", 32, 96)
    assert not built_kernels.fits("int4", 48, 128) and not built_kernels.fits("int8", 48, 128)
    assert not built_kernels.fits("int8", 64, 80)


# --- arithmetic ---------------------------------------------------------------------------------------------------


@VARIANT_MODES
@pytest.mark.parametrize("n, k", [(32, 64), (192, 256), (96, 384), (64, 96)])
@pytest.mark.parametrize("rows", [1, 2, 6, 7, 12, 13, 16, 17, 32, 33, 64, 65, 150])
def test_kernel_equals_float32_up_to_the_output_rounding(kernel, mode, n, k, rows):
    """Products of bf16 activations and small integers are exact, sums float32: the only visible error is rounding
    the result to bf16 (half a unit in the last place, 2^-9 relative; the AVX2 variants' rounding of the smallest
    activations, bounded below, stays under the 1e-5 margin here)."""
    qweight, qscale = canonical(mode, n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n)).bfloat16()
    got = kernel(x, *built_kernels.pack(qweight, qscale, mode), mode)
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
    packed = built_kernels.pack(qweight, qscale, mode)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    full = kernel(x, *packed, mode)
    for i in range(37):
        assert torch.equal(kernel(x[i:i + 1], *packed, mode), full[i:i + 1])
    assert torch.equal(kernel(x[:13], *packed, mode), full[:13])


@VARIANT_MODES
def test_threads_do_not_change_the_result(kernel, mode):
    qweight, qscale = canonical(mode, 4096, 128)
    packed = built_kernels.pack(qweight, qscale, mode)
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
    packed, scales = built_kernels.pack(qweight, qscale, mode)
    other = "int8" if mode == "int4" else "int4"
    x = torch.randn(2, 128).bfloat16()
    for args in [(x.float(), packed, scales, mode), (x[:, :64], packed, scales, mode),
                 (x, packed, scales.float(), mode), (x, packed[:1], scales, mode), (x, packed, scales, other)]:
        with pytest.raises(JanusError, match="internal: int[48] kernel given"):
            kernel(*args)


def picking_weight(mode: str, columns: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A canonical ``mode`` weight whose output n is input ``columns[n]`` times 1 (int4: q = 9 there, 8 elsewhere,
    scale 1, zero 0; int8: q = 1 there, 0 elsewhere, scale 1): the output shows the activation the kernel used."""
    if mode == "int8":
        qweight = torch.zeros(len(columns), k, dtype=torch.int8)
        qweight[torch.arange(len(columns)), torch.tensor(columns)] = 1
        return qweight, torch.ones(len(columns), dtype=torch.bfloat16)
    values = torch.full((len(columns), k), 8, dtype=torch.uint8)
    values[torch.arange(len(columns)), torch.tensor(columns)] = 9
    qscale = torch.zeros(len(columns), k // formats.int4_group_size(k), 2, dtype=torch.bfloat16)
    qscale[..., 0] = 1
    return (values[:, 0::2] << 4) | values[:, 1::2], qscale


@INT16_VARIANTS
def test_activations_are_int16_times_a_power_of_two_per_run(kernel, mode):
    """The 16-bit dot-product variants write each run of ``group`` activations as round(x / d) * d, d = 2^(E - 15)
    where 2^E bounds the run's largest |x| (values within 2^8 of it stay exact); runs below 2^-100 count as zero."""
    k = 512
    group = formats.int4_group_size(k)
    gen = torch.Generator().manual_seed(5)
    run_scale = torch.tensor([1e-31, 1e-3, 1.0, 3e4]).repeat(k // group // 4)[torch.randperm(k // group, generator=gen)]
    x = torch.randn(3, k, generator=gen) * 10.0 ** -torch.randint(0, 7, (3, k), generator=gen).float()
    x = (x * run_scale.repeat_interleave(group)).bfloat16()
    columns = torch.randperm(k, generator=gen)[:96].tolist()
    got = kernel(x, *built_kernels.pack(*picking_weight(mode, columns, k), mode), mode)
    runs = x.double().view(3, -1, group)
    top = runs.abs().amax(-1, keepdim=True)
    d = 2.0 ** (torch.floor(torch.log2(top)) + 1 - 15)
    used = torch.where(top < 2.0**-100, 0.0, torch.round(runs / d) * d).view(3, k)  # round: half to even
    assert torch.equal(got, used[:, columns].bfloat16())
    assert not torch.equal(used, x.double())  # some activations were rounded (or zeroed)
    near = (runs.abs() >= top * 2.0**-7).view(3, k) & (top >= 2.0**-100).expand_as(runs).reshape(3, k)
    assert torch.equal(used[near], x.double()[near])


@INT16_VARIANTS
def test_a_non_finite_activation_makes_its_row_nan(kernel, mode):
    qweight, qscale = canonical(mode, 64, 256)
    packed = built_kernels.pack(qweight, qscale, mode)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(6)).bfloat16()
    x[1, 3], x[2, 200] = float("inf"), float("nan")
    got = kernel(x, *packed, mode)
    assert got[1:3].isnan().all()
    assert torch.equal(got[[0, 3]], kernel(x[[0, 3]], *packed, mode)) and not got[[0, 3]].isnan().any()


def test_an_unknown_variant_is_named():
    qweight, qscale = canonical("int4", 32, 64)
    with pytest.raises(JanusError, match="no kernel variant 'avx1024'"):
        built_kernels.matmul(torch.zeros(1, 64).bfloat16(), *built_kernels.pack(qweight, qscale, "int4"), "int4",
                             variant="avx1024")


# --- when it is offered, the build ---------------------------------------------------------------------------------


NATIVE_CAPS = precision.CpuCaps(model="test", arch="x86_64", capability="AVX512", avx512_bf16=True, onednn_bf16=True,
                                avx512_vnni=True, flags=("avx2", "fma", "avx512f", "avx512_bf16"))
AVX2_CAPS = precision.CpuCaps(model="test", arch="x86_64", capability="AVX2", flags=("avx2", "fma"))
ALL = built_kernels.PREFERENCE


@pytest.mark.parametrize("caps, change, env, runs", [
    (NATIVE_CAPS, {}, {}, (built_kernels.AVX512, built_kernels.AVX512_VNNI, built_kernels.AVX2)),
    (NATIVE_CAPS, {"amx_bf16": True}, {},
     (built_kernels.AMX, built_kernels.AVX512, built_kernels.AVX512_VNNI, built_kernels.AVX2)),
    (NATIVE_CAPS, {"amx_bf16": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
     (built_kernels.AVX512, built_kernels.AVX512_VNNI, built_kernels.AVX2)),
    (NATIVE_CAPS, {"avx512_bf16": False}, {}, (built_kernels.AVX512_VNNI, built_kernels.AVX2)),  # Ice Lake
    (NATIVE_CAPS, {}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, (built_kernels.AVX2,)),
    (NATIVE_CAPS, {"capability": "AVX2"}, {}, (built_kernels.AVX2,)),  # ATEN_CPU_CAPABILITY=avx2
    (AVX2_CAPS, {}, {}, (built_kernels.AVX2,)),
    (AVX2_CAPS, {"avx_vnni": True}, {}, (built_kernels.AVX_VNNI, built_kernels.AVX2)),
    (AVX2_CAPS, {"avx_vnni": True}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, (built_kernels.AVX2,)),
    (AVX2_CAPS, {"capability": "DEFAULT"}, {}, ()),
    (AVX2_CAPS, {"flags": ("avx2",)}, {}, ()),  # no FMA
    (NATIVE_CAPS, {"arch": "aarch64"}, {}, ()),
    (NATIVE_CAPS, {}, {built_kernels.SWITCH: "0"}, ()),
])
def test_variants_offered_by_cpu_instructions_and_torch_limits(caps, change, env, runs, monkeypatch):
    """Each variant needs its instructions and that torch may use them (``ATEN_CPU_CAPABILITY``,
    ``ONEDNN_MAX_CPU_ISA``: also how the benchmarks stand in for a smaller CPU); the first one offered is used."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    caps = dataclasses.replace(caps, onednn_isa_limit=env.get("ONEDNN_MAX_CPU_ISA", ""), **change)
    monkeypatch.setattr(built_kernels.sys, "platform", "linux")
    problem = built_kernels.platform_problem(caps)
    offered = () if problem else tuple(v for v in ALL if built_kernels.cpu_problem(v, caps) is None)
    assert offered == runs
    if not runs:
        assert problem and any(words in problem for words in ("AVX2 and FMA", "ATEN_CPU_CAPABILITY", "x86-64 only",
                                                                "turned off"))


@pytest.fixture
def build_anywhere(monkeypatch, tmp_path):
    """Build into an empty cache as if the CPU took the AVX2 variant only (compiling needs no AVX2; running does)."""
    monkeypatch.setattr(built_kernels, "platform_problem", lambda caps: None)
    monkeypatch.setattr(built_kernels, "cpu_problem",
                        lambda variant, caps: None if variant == built_kernels.AVX2 else "needs other instructions")
    monkeypatch.setenv("JANUS_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_built_once_then_taken_from_the_cache(build_anywhere, monkeypatch):
    if built_kernels._compiler() is None:
        pytest.skip("no C compiler on this machine")
    build = built_kernels.BUILDS[built_kernels.AVX2]
    first = built_kernels._library_path(build.source, build.flags)
    assert first.parent == build_anywhere and first.suffix == ".so" and first.stat().st_size > 0
    assert not list(build_anywhere.glob("*.partial"))
    monkeypatch.setattr(built_kernels, "_build", lambda *args: pytest.fail("built again"))
    assert built_kernels._library_path(build.source, build.flags) == first
    built = []
    monkeypatch.setattr(built_kernels, "_build", lambda source, flags, target: built.append(target))
    vnni = built_kernels.BUILDS[built_kernels.AVX_VNNI]  # the same source with other flags: a file of its own
    assert built_kernels._library_path(vnni.source, vnni.flags) == built[0] != first


@pytest.mark.parametrize("compiler, message", [
    ("/nonexistent/cc", "could not run"),
    ("false", "failed"),
])
def test_a_failed_build_is_named_and_the_stock_kernels_serve(build_anywhere, monkeypatch, caplog, compiler, message):
    monkeypatch.setenv("CC", compiler)
    caplog.set_level(logging.INFO)
    reason = built_kernels.unavailable_reason("int4")
    assert reason.startswith("the avx2 variant could not be built or loaded") and message in reason
    assert "Install a C compiler" in caplog.text and "the stock kernels serve instead" in caplog.text
    assert not list(build_anywhere.glob("*"))  # nothing half-written left in the cache
    for mode in ("int4", "int8"):
        choice = kernel_for(CPU, mode, torch.bfloat16)
        assert choice.layout != LAYOUT[mode] and f"{mode} kernel built here" in choice.reason
        assert message in choice.reason


def test_without_a_compiler_the_reason_says_so(build_anywhere, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(built_kernels.shutil, "which", lambda name: None)
    assert "no C compiler found (set CC" in built_kernels.unavailable_reason("int4")


@pytest.mark.parametrize("runs, int4, int8", [
    ((built_kernels.AMX, built_kernels.AVX512, built_kernels.AVX512_VNNI, built_kernels.AVX2),
     built_kernels.AMX, built_kernels.AMX),
    ((built_kernels.AVX512, built_kernels.AVX512_VNNI, built_kernels.AVX2), built_kernels.AVX512,
     built_kernels.AVX512_VNNI),
    ((built_kernels.AVX_VNNI, built_kernels.AVX2), built_kernels.AVX_VNNI, None),  # int8: oneDNN's GEMM
    ((built_kernels.AVX2,), built_kernels.AVX2, built_kernels.AVX2),
])
def test_each_mode_takes_the_best_variant_that_has_it(runs, int4, int8, monkeypatch):
    """AMX CPUs: both modes on AMX tiles; AVX512-BF16 ones int4 on bf16 dot products and int8 on 16-bit integer ones
    (that variant has no int8); AVX-VNNI ones int4 on 16-bit dot products, int8 on oneDNN's GEMM (measured faster
    there), not on the AVX2 variant; the others both on 16-bit dot products (fake builds stand for the C code: the
    choice is under test)."""
    def fake(*args):
        raise RuntimeError("a fake kernel")
    monkeypatch.setattr(built_kernels, "platform_problem", lambda caps: None)
    monkeypatch.setattr(built_kernels, "cpu_problem", lambda v, caps: None if v in runs else "needs other instructions")
    monkeypatch.setattr(built_kernels, "_variant", lambda v: ({m: fake for m in built_kernels.BUILDS[v].symbols}, None)
                        if v in runs else (None, "needs other instructions"))
    assert (built_kernels.chosen_variant("int4"), built_kernels.chosen_variant("int8")) == (int4, int8)
    if int8 is None:
        assert built_kernels.unavailable_reason("int8") == ("leaves int8 to the stock kernels on avxvnni CPUs "
                                                            "(measured faster there)")
    for mode, variant in (("int4", int4), ("int8", int8)):
        choice = kernel_for(CPU, mode, torch.bfloat16)  # a fake fails its self-check: the stock kernel serves
        assert choice.layout != LAYOUT[mode]
        assert ("RuntimeError: a fake kernel" if variant else "leaves int8 to the stock kernels") in choice.reason


def test_this_machine_uses_the_best_variant_it_runs():
    caps = precision.local_cpu_caps()
    runs = tuple(v for v in ALL if built_kernels.cpu_problem(v, caps) is None)
    if built_kernels.platform_problem(caps) or not runs:
        pytest.skip(f"the built kernels {built_kernels.unavailable_reason('int4')}")
    assert built_kernels.runnable_variants() == runs
    for mode in ("int4", "int8"):
        first = next(v for v in runs if mode in built_kernels.BUILDS[v].symbols)
        expect = first if built_kernels.BUILDS[first].symbols[mode] else None
        assert built_kernels.chosen_variant(mode) == expect
    cpu_class = precision.bf16_class(caps)
    vnni = caps.avx_vnni and precision.onednn_allows(caps.onednn_isa_limit, "AVX2_VNNI")
    assert built_kernels.chosen_variant("int4") == {precision.AMX: built_kernels.AMX,
                                                     precision.NATIVE: built_kernels.AVX512}.get(
        cpu_class, runs[0] if built_kernels.AVX512_VNNI in runs else built_kernels.AVX_VNNI if vnni
        else built_kernels.AVX2)


def test_amx_state_refused_is_named_and_the_next_variant_serves(monkeypatch, tmp_path, caplog):
    """An AMX CPU whose Linux does not grant AMX state (or a compiler without AMX) uses the next variants and says
    why, rather than faulting on the first tile instruction."""
    if built_kernels._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("JANUS_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(built_kernels, "platform_problem", lambda caps: None)
    monkeypatch.setattr(built_kernels, "cpu_problem", lambda variant, caps: None)
    monkeypatch.setattr(built_kernels, "_amx_problem", lambda library: "Linux did not grant this process AMX state")
    caplog.set_level(logging.WARNING)
    assert built_kernels.chosen_variant("int4") == built_kernels.AVX512
    assert built_kernels.chosen_variant("int8") == built_kernels.AVX512_VNNI
    for mode, variant in (("int4", built_kernels.AVX512), ("int8", built_kernels.AVX512_VNNI)):
        assert (f"{mode} on this CPU: the amx variant cannot use AMX: Linux did not grant this process AMX state; the "
                f"{variant} variant serves instead") in caplog.text


@MODES
def test_a_wrong_kernel_fails_its_self_check(chosen, mode, monkeypatch):
    monkeypatch.setattr(built_kernels, "matmul", lambda x, packed, scales, mode: chosen(x, packed, scales, mode) * 2)
    choice = kernel_for(CPU, mode, torch.bfloat16)
    assert choice.layout != LAYOUT[mode] and "kernel built here failed its self-check" in choice.reason


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

    monkeypatch.setenv(built_kernels.SWITCH, "0")
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
