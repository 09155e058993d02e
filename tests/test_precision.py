"""Per-component precision and matmul form by device capability, with the capability faked.

The decision functions are pure; the loading tests fake this machine's CPU class and check that every
component gets its dtype, the boundaries between components cast correctly (results stay close to the float32
goldens), and the VQ decoder kept in float32 gives the float32 golden decode.
"""

import logging
from dataclasses import replace

import pytest
import torch

import janus_core
from janus_core import precision
from janus_core.generate_ar import build_cfg_pair, cfg_logit_steps, decode_image_tokens
from janus_core.generate_flow import build_flow_cfg, iter_flow_steps
from janus_core.precision import (
    AMX,
    DIRECT,
    EMULATED,
    FP32_CHUNKS,
    FP32_ROWS,
    NATIVE,
    SDPA,
    W_XT,
    WINOGRAD,
    X_WT,
    CpuCaps,
    Precision,
    attention_form,
    bf16_class,
    choose_precision,
    conv_form,
    matmul_form,
    probe_cpu,
)
from janus_core.understanding import understanding_embeds
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY, golden

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

SAPPHIRE_RAPIDS = CpuCaps("Intel Xeon Platinum 8481C", "x86_64", "AVX512", avx512_bf16=True, amx_bf16=True,
                          onednn_bf16=True, avx512_vnni=True, amx_int8=True)
ZEN4 = CpuCaps("AMD EPYC 9R14", "x86_64", "AVX512", avx512_bf16=True, onednn_bf16=True, avx512_vnni=True)
ALDER_LAKE = CpuCaps("12th Gen Intel Core i7-12700", "x86_64", "AVX2", avx_vnni=True)
ZEN3 = CpuCaps("AMD EPYC 7R13", "x86_64", "AVX2")
SKYLAKE_X = CpuCaps("Intel Xeon Gold 6148", "x86_64", "AVX512", onednn_bf16=True)  # AVX-512, no bf16 instructions
GRAVITON3 = CpuCaps("Neoverse-V1", "aarch64", "SVE256", arm_bf16=True, onednn_bf16=True)
APPLE_M1 = CpuCaps("Apple M1", "arm64", "DEFAULT")


@pytest.mark.parametrize(("caps", "expected"), [
    (SAPPHIRE_RAPIDS, AMX),
    (replace(SAPPHIRE_RAPIDS, onednn_isa_limit="AVX512_CORE_BF16"), NATIVE),  # AMX capped away
    (replace(SAPPHIRE_RAPIDS, onednn_isa_limit="avx2", onednn_bf16=False), EMULATED),
    (replace(SAPPHIRE_RAPIDS, onednn_isa_limit="ALL"), AMX),
    (ZEN4, NATIVE),
    (replace(ZEN4, onednn_isa_limit="AVX512_CORE"), EMULATED),  # oneDNN converts: measured 2x slower than fp32
    (replace(ZEN4, onednn_bf16=False), EMULATED),  # a torch build without oneDNN bf16
    (ZEN3, EMULATED),
    (SKYLAKE_X, EMULATED),
    (GRAVITON3, NATIVE),
    (replace(GRAVITON3, onednn_bf16=False), EMULATED),
    (APPLE_M1, EMULATED),
])
def test_bf16_class(caps, expected):
    assert bf16_class(caps) == expected
    assert expected in caps.describe() and caps.model in caps.describe()


@pytest.mark.parametrize(("caps", "expected"), [
    (SAPPHIRE_RAPIDS, True),
    (replace(SAPPHIRE_RAPIDS, avx512_vnni=False, onednn_isa_limit="AVX512_CORE_BF16"), False),  # AMX capped away
    (ZEN4, True),
    (replace(ZEN4, onednn_isa_limit="AVX2_VNNI"), False),  # AVX-512 VNNI capped away, no AVX-VNNI
    (replace(ZEN4, onednn_isa_limit="AVX2"), False),
    (ALDER_LAKE, True),
    (replace(ALDER_LAKE, onednn_isa_limit="AVX2"), False),
    (ZEN3, False),
    (SKYLAKE_X, False),
    (replace(GRAVITON3, avx512_vnni=True), False),  # not x86: oneDNN's int8 GEMM is not used there
    (APPLE_M1, False),
])
def test_int8_dot_product(caps, expected):
    assert precision.int8_dot_product(caps) is expected


def test_probe_reads_this_machine(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    caps = probe_cpu()
    assert caps.onednn_isa_limit == "AVX2"
    assert caps.capability == torch.backends.cpu.get_cpu_capability()
    assert bf16_class(caps) == EMULATED  # whatever the hardware: oneDNN may not use more than AVX2
    assert not precision.int8_dot_product(caps)
    assert all(f in precision.REPORTED_FLAGS for f in caps.flags)


@pytest.mark.parametrize("cpu_class", [AMX, NATIVE])
def test_cpus_with_bf16_instructions_run_everything_in_bf16(cpu_class):
    assert choose_precision("cpu", None, cpu_class) == Precision.uniform(BF16)


def test_cpus_without_bf16_instructions_keep_convolutions_in_fp32():
    p = choose_precision("cpu", None, EMULATED)
    assert (p.llm, p.gen_head) == (BF16, BF16)  # bf16 weights: half the bytes per decode step
    assert (p.vq, p.vision, p.flow, p.vae) == (FP32, FP32, FP32, FP32)
    assert precision.slow_choices(p, EMULATED) == []


@pytest.mark.parametrize("cpu_class", [AMX, NATIVE, EMULATED])
def test_requested_dtype_wins(cpu_class):
    assert choose_precision("cpu", BF16, cpu_class) == Precision.uniform(BF16)
    assert choose_precision("cpu", FP32, cpu_class) == Precision.uniform(FP32)
    half = choose_precision("cpu", FP16, cpu_class)
    assert (half.llm, half.vision, half.flow) == (FP16, FP16, FP16)
    assert (half.vq, half.gen_head, half.vae) == (FP32, FP32, FP32)  # overflow / token choice
    slow = precision.slow_choices(choose_precision("cpu", BF16, cpu_class), cpu_class)
    assert slow == ([] if cpu_class != EMULATED else ["vq", "vision", "flow", "vae"])


def test_gpus():
    assert choose_precision("cuda", None, cuda_bf16=True) == Precision.uniform(BF16)
    for p in (choose_precision("cuda", None, cuda_bf16=False), choose_precision("mps")):
        assert (p.llm, p.vq, p.gen_head) == (FP16, FP32, FP32)
    assert choose_precision("cuda", FP32, cuda_bf16=True) == Precision.uniform(FP32)


def test_bad_requests():
    with pytest.raises(ValueError, match="CPU's bf16 class"):
        choose_precision("cpu")
    with pytest.raises(ValueError, match="floating point"):
        choose_precision("cpu", torch.int8, NATIVE)
    with pytest.raises(KeyError, match="unknown model component"):
        Precision.uniform(BF16).of("lm_head")


@pytest.mark.parametrize(("cpu_class", "dtype", "forms"), [
    # rows:                1     2     4     5            16    17    32    256   257
    (AMX, BF16, [W_XT, W_XT, W_XT, W_XT, W_XT, W_XT, W_XT, W_XT, X_WT]),
    (NATIVE, BF16, [X_WT, X_WT, X_WT, X_WT, X_WT, W_XT, W_XT, W_XT, X_WT]),
    (EMULATED, BF16, [X_WT, X_WT, X_WT, FP32_CHUNKS, FP32_CHUNKS, FP32_CHUNKS, FP32_CHUNKS, FP32_CHUNKS,
                      FP32_CHUNKS]),
    (EMULATED, FP32, [W_XT] * 9),
    (NATIVE, FP16, [X_WT] * 9),
])
def test_matmul_form_table(cpu_class, dtype, forms):
    rows = [1, 2, 4, 5, 16, 17, 32, 256, 257]
    assert [matmul_form(dtype, r, "cpu", cpu_class) for r in rows] == forms
    assert {matmul_form(dtype, r, "cuda") for r in rows} == {X_WT}


def test_attention_form():
    # one-query decode steps over a bf16 cache: row by row in fp32 on CPUs without AMX
    assert [attention_form(BF16, 1, "cpu", c) for c in (AMX, NATIVE, EMULATED)] == [SDPA, FP32_ROWS, FP32_ROWS]
    assert attention_form(BF16, 577, "cpu", NATIVE) == SDPA  # prefill / JanusFlow: compute-bound, torch's kernel
    assert attention_form(FP32, 1, "cpu", NATIVE) == SDPA
    assert attention_form(BF16, 1, "cuda") == SDPA


def test_conv_form():
    three = ((3, 3), (1, 1), (1, 1), 1)
    assert conv_form(FP32, "cpu", *three, nnpack=True) == WINOGRAD
    assert conv_form(FP32, "cpu", *three, nnpack=False) == DIRECT
    assert conv_form(BF16, "cpu", *three, nnpack=True) == DIRECT
    assert conv_form(FP32, "cuda", *three, nnpack=True) == DIRECT
    assert conv_form(FP32, "cpu", (3, 3), (2, 2), (1, 1), 1, nnpack=True) == DIRECT  # the VQ encoder's downsample
    assert conv_form(FP32, "cpu", (1, 1), (1, 1), (1, 1), 1, nnpack=True) == DIRECT


def test_winograd_vq_decode_matches_the_golden(monkeypatch):
    """The float32 VQ decoder gives the golden decode with and without NNPACK (the forms differ in rounding)."""
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=FP32)
    g = golden(PRO_TINY, "vq_decode")
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or nnpack(*a))
    for available in (True, False) if torch._nnpack_available() else (False,):
        monkeypatch.setattr(precision, "nnpack_available", lambda available=available: available)
        calls.clear()
        with torch.inference_mode():
            decoded = model.net.gen_vision_model.decode_code(g["codes"], (24, 24))
        assert bool(calls) == available
        torch.testing.assert_close(decoded, g["decoded"], rtol=1e-4, atol=1e-4 * g["decoded"].abs().max().item())


@pytest.fixture()
def emulated(monkeypatch):
    """This machine as a CPU without bf16 instructions."""
    monkeypatch.setattr(precision, "local_cpu_class", lambda: EMULATED)


def _dtypes(model) -> dict[str, set[torch.dtype]]:
    out: dict[str, set[torch.dtype]] = {}
    for name, p in model.net.named_parameters():
        out.setdefault(name.split(".", 1)[0], set()).add(p.dtype)
    return out


def test_auto_on_a_cpu_without_bf16_instructions(emulated, caplog):
    with caplog.at_level(logging.INFO, logger="janus_core"):
        model = janus_core.load_model(PRO_TINY, device="cpu")
    assert "vq fp32" in caplog.text and "llm bf16" in caplog.text  # the choice is logged
    assert "slower" not in caplog.text
    dtypes = _dtypes(model)
    for name in ("language_model", "gen_head", "gen_aligner", "gen_embed"):
        assert dtypes[name] == {BF16}, name
    for name in ("gen_vision_model", "vision_model", "aligner"):
        assert dtypes[name] == {FP32}, name
    assert model.dtype == BF16 and model.llm.cpu_class == EMULATED

    # the VQ decoder runs in float32: the float32 golden decode, whatever the LLM's dtype
    g = golden(PRO_TINY, "vq_decode")
    images = decode_image_tokens(model, g["codes"])
    expected = ((g["decoded"].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)

    # the gen head (bf16, float32-chunk matmuls for the 4 rows) follows the float32 model's logits
    full = janus_core.load_model(PRO_TINY, device="cpu", dtype=FP32)
    logits = []
    for m in (full, model):
        _, out = next(cfg_logit_steps(m, build_cfg_pair(m, "A red cube.", batch_size=2)))
        logits.append(out.float())
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=3e-2 * logits[0].abs().max().item())

    # SigLIP in float32 feeds the bf16 LLM: the fused embeddings are the golden ones, rounded to bf16
    from PIL import Image

    gold = golden(PRO_TINY, "understanding")
    embeds, _ = understanding_embeds(model, [Image.open(IMAGE_PATH).convert("RGB")], "Describe this image.")
    assert embeds.dtype == BF16
    torch.testing.assert_close(embeds.float(), gold["inputs_embeds"][0], rtol=1e-2, atol=1e-2)


def test_flow_on_a_cpu_without_bf16_instructions(emulated):
    model = janus_core.load_model(FLOW_TINY, device="cpu")
    dtypes = _dtypes(model)
    assert dtypes["language_model"] == {BF16}
    for name in ("vision_gen_enc_model", "vision_gen_dec_model", "vision_gen_dec_aligner", "vision_und_enc_model"):
        assert dtypes[name] == {FP32}, name
    flow = golden(FLOW_TINY, "flow")
    pair = build_flow_cfg(model, "a cat", batch_size=2)
    full = janus_core.load_model(FLOW_TINY, device="cpu", dtype=FP32)
    for st, ref in zip(iter_flow_steps(model, pair, flow["z0"], 3), iter_flow_steps(full, pair, flow["z0"], 3),
                       strict=True):
        assert st.z.dtype == FP32
        torch.testing.assert_close(st.velocity, ref.velocity, rtol=0, atol=5e-2 * ref.velocity.abs().max().item())


def test_requested_bf16_wins_and_warns(emulated, caplog):
    with caplog.at_level(logging.WARNING, logger="janus_core"):
        model = janus_core.load_model(PRO_TINY, device="cpu", dtype=BF16)
    assert {p.dtype for p in model.net.parameters()} == {BF16}
    assert "VQ image decoder" in caplog.text and "dtype auto keeps them in fp32" in caplog.text


def test_precision_is_chosen_for_the_compute_device(monkeypatch):
    """ComfyUI reads the weights to the CPU and runs them on the GPU: the GPU's precision applies."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    model = janus_core.load_model(PRO_TINY, device="cpu", compute_device="cuda")
    assert model.device.type == "cpu"
    assert model.precision == choose_precision("cuda", None, cuda_bf16=False)
    assert _dtypes(model)["gen_vision_model"] == {FP32} and model.dtype == FP16
