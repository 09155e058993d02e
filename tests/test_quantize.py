"""Weight-only int8 / int4: number formats, kernels against the fallback, quantized tiny models against the goldens,
quantized folders, and the combinations that are refused."""

import json
import shutil

import pytest
import torch
from PIL import Image
from torch import nn

import janus_core
from janus_core import precision
from janus_core.errors import CheckpointError, JanusError
from janus_core.generate_ar import generate_image_tokens, score_image_tokens
from janus_core.quant import built_kernels, formats, kernels
from janus_core.quant.folder import QUANT_FILE, read_quantization, save_quantized
from janus_core.quant.kernels import CPU_INT4, PLAIN, TILED_INT4, QuantizedWeight, kernel_for, matmul, pack
from janus_core.quant.linear import EMBEDDINGS, QuantEmbedding, QuantLinear, quant_layers, quantize_modules
from tests.conftest import (
    FLOW_TINY,
    IMAGE_PATH,
    PRO_TINY,
    golden,
    teacher_forced_answer_logits,
    teacher_forced_cfg_logits,
)

CPU = torch.device("cpu")


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")


# --- formats ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_round_trip_error_is_at_most_half_a_step(mode):
    w = random_weight(96, 256)
    w[0] = 0.0  # a constant row / group must come back exactly
    w[1, :128] = 0.37
    qweight, qscale = formats.quantize(w, mode)
    back = formats.dequantize(qweight, qscale, mode)
    if mode == "int8":
        step = qscale.float()[:, None].expand_as(w)
        assert qweight.dtype == torch.int8 and qweight.abs().max() <= 127
    else:
        group = formats.int4_group_size(256)
        step = qscale[..., 0].float().repeat_interleave(group, dim=1)
        assert qweight.shape == (96, 128) and qweight.dtype == torch.uint8
    assert torch.all((back - w).abs() <= 0.5 * step * 1.02 + 1e-7)
    assert torch.equal(back[0], w[0])
    assert torch.allclose(back[1, :128], w[1, :128], rtol=1e-2)
    relative = float((back - w).norm() / w.norm())
    assert relative < (0.01 if mode == "int8" else 0.11)  # measured: 0.0074 / 0.0997 on normal weights


def test_int4_group_size_follows_in_features():
    assert [formats.int4_group_size(k) for k in (4096, 11008, 96, 64, 32)] == [128, 128, 32, 64, 32]
    with pytest.raises(JanusError, match="multiple of 32"):
        formats.int4_group_size(48)


def test_stored_sizes():
    assert formats.stored_bytes("int8", 4096, 11008) == 4096 * 11008 + 4096 * 2
    assert formats.stored_bytes("int4", 4096, 11008) == 4096 * 11008 // 2 + 4096 * 86 * 2 * 2
    assert formats.stored_elements("int4", 64, 256) == 64 * 128 + 64 * 2 * 2


def test_quantize_does_not_touch_its_input():
    w = random_weight(8, 64)
    before = w.clone()
    formats.quantize(w, "int8")
    assert torch.equal(w, before)


# --- kernels ---------------------------------------------------------------------------------------------------


def quantized(mode: str, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """A weight laid out for the kernel chosen on the CPU for ``dtype``, and its dequantized float32 value."""
    w = random_weight(n, k, seed)
    qweight, qscale = formats.quantize(w, mode)
    choice = kernel_for(CPU, mode, dtype)
    packed, scales = pack(qweight, qscale, mode, choice.layout, dtype)
    handle = QuantizedWeight(packed, scales, mode, choice.layout, choice.kernel, formats.group_size(mode, k), (n, k))
    return handle, formats.dequantize(qweight, qscale, mode)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 8, 20, 65, 300, 400])
def test_kernel_and_dequantized_path_equal_the_reference(mode, rows):
    """bf16 on the CPU: the kernel serves few rows, dequantize-then-matmul many; both equal x @ dequantized.T."""
    handle, reference = quantized(mode, 192, 256, torch.bfloat16)
    assert handle.kernel is not None  # this torch has both CPU kernels
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
    got = matmul(x, handle).float()
    expect = x.float() @ reference.t()
    assert got.shape == (rows, 192)
    assert float((got - expect).abs().max() / expect.abs().max()) < 1.5e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_rows_decide_between_kernel_and_dequantize(mode, monkeypatch, stock_kernels):
    handle, _ = quantized(mode, 192, 256, torch.bfloat16)
    assert "cpu" in handle.kernel.device_types
    calls = []

    def dequantized(x, w, cpu_class):
        calls.append(x.shape[0])
        return x.new_zeros(x.shape[0], 192)

    monkeypatch.setattr(kernels, "_dequantized_matmul", dequantized)
    limit = handle.kernel.max_rows
    for rows in (1, limit, limit + 1):
        matmul(torch.zeros(rows, 256, dtype=torch.bfloat16), handle)
    assert calls == [limit + 1]


@pytest.mark.parametrize("cpu_class, rows, work, by_row", [
    (precision.EMULATED, 64, torch.float32, False),  # bf16 matmuls over many rows are emulated there: float32 chunks
    (precision.EMULATED, 2, torch.bfloat16, True),
    (precision.NATIVE, 2, torch.bfloat16, True),  # x @ chunk.T up to 16 rows, chunk @ x.T above
    (precision.NATIVE, 64, torch.bfloat16, False),
    (precision.AMX, 64, torch.bfloat16, False),
])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantized_chunks_follow_the_cpu_class(mode, cpu_class, rows, work, by_row, monkeypatch, stock_kernels):
    handle, reference = quantized(mode, 192, 256, torch.bfloat16)
    seen = []
    mm = torch.mm

    def recording_mm(a, b, **kw):
        seen.append((a.dtype, b.dtype, a.shape[0] == rows))
        return mm(a, b, **kw)

    monkeypatch.setattr(torch, "mm", recording_mm)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = kernels._dequantized_matmul(x, handle, cpu_class)
    monkeypatch.undo()
    assert seen and set(seen) == {(work, work, by_row)}
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 192)
    expect = x.float() @ reference.t()
    assert float((got.float() - expect).abs().max() / expect.abs().max()) < 1e-2


def test_dequantized_matmul_asks_for_the_local_class_only_when_not_told(monkeypatch, stock_kernels):
    handle, _ = quantized("int8", 192, 256, torch.bfloat16)
    asked = []
    monkeypatch.setattr(precision, "local_cpu_class", lambda: asked.append(1) or precision.EMULATED)
    x = torch.randn(handle.kernel.max_rows + 1, 256).bfloat16()
    told = matmul(x, handle, precision.NATIVE)
    assert not asked
    assert torch.equal(matmul(x, handle), kernels._dequantized_matmul(x, handle, precision.EMULATED)) and asked
    assert float((told.float() - matmul(x, handle).float()).abs().max()) < 5e-2 * float(told.float().abs().max())


@pytest.mark.parametrize("mode, native", [("int8", True), ("int4", True), ("int8", False), ("int4", False)],
                         ids=["int8", "int4", "int8-stock-kernel", "int4-stock-kernel"])
def test_kernel_equals_fallback(mode, native, monkeypatch):
    if not native:
        monkeypatch.setenv(built_kernels.SWITCH, "0")
    handle, _ = quantized(mode, 192, 256, torch.bfloat16)
    kernel = handle.kernel
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    via_kernel = kernel.run(x, handle.qweight, handle.qscale, handle.group).float()
    qweight, qscale = formats.quantize(random_weight(192, 256), mode)
    plain = QuantizedWeight(qweight, qscale.bfloat16(), mode, PLAIN, None, handle.group, (192, 256))
    via_fallback = kernels._dequantized_matmul(x, plain, precision.local_cpu_class()).float()
    assert float((via_kernel - via_fallback).abs().max() / via_fallback.abs().max()) < 1.5e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_and_float16_dequantize_exactly(dtype):
    handle, reference = quantized("int4", 64, 128, dtype)
    assert handle.layout == PLAIN and handle.kernel is None
    x = torch.randn(3, 128, dtype=torch.float64).to(dtype)
    got = matmul(x, handle)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), (x.float() @ reference.t()), rtol=2e-3 if dtype == torch.float16 else 1e-5,
                               atol=1e-3 if dtype == torch.float16 else 1e-6)


def test_cpu_int4_layout_is_recognised_and_checked():
    blocks = kernels.cpu_int4_blocks()
    assert blocks is not None and 192 % blocks[0] == 0 and sorted(blocks[1]) == list(range(blocks[0]))
    values = torch.randint(0, 16, (2 * blocks[0], 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
    assert torch.equal(kernels._unpack_blocks(packed, blocks, slice(0, 2 * blocks[0]), 64).int(), values)


def test_unrecognised_cpu_int4_layout_uses_the_kernel_for_many_rows(monkeypatch, stock_kernels):
    monkeypatch.setattr(kernels, "cpu_int4_blocks", lambda: None)
    handle, reference = quantized("int4", 192, 256, torch.bfloat16)
    assert handle.layout == CPU_INT4
    x = torch.randn(200, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    expect = x.float() @ reference.t()
    assert float((matmul(x, handle).float() - expect).abs().max() / expect.abs().max()) < 1.5e-2


def test_failing_self_check_falls_back_or_refuses(monkeypatch, caplog, stock_kernels):
    real = torch.ops.aten._weight_int4pack_mm_for_cpu

    def wrong(x, packed, group, scale_zeros):
        return real(x, packed, group, scale_zeros) * 1.5

    monkeypatch.setattr(kernels, "_aten", lambda name: wrong if name == "_weight_int4pack_mm_for_cpu"
                        else getattr(torch.ops.aten, name, None))
    choice = kernel_for(CPU, "int4", torch.bfloat16)
    assert choice.kernel is None and choice.fallback and "self-check" in choice.reason
    assert "failed its self-check" in caplog.text
    with pytest.raises(JanusError, match="No working int4 kernel on cpu.*fallback"):
        kernel_for(CPU, "int4", torch.bfloat16, fallback=False)


def test_device_without_kernel_and_no_fallback_is_refused(monkeypatch, stock_kernels):
    """int4 on a device whose torch lacks the kernel: the fallback serves, unless it is not allowed."""
    monkeypatch.setattr(kernels, "_aten", lambda name: None if "int4" in name else getattr(torch.ops.aten, name))
    with pytest.raises(JanusError, match="No working int4 kernel on cpu.*not in this torch"):
        janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4", quantize_fallback=False)
    kernels._CHOICES.clear()
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")
    assert {m.layout for m in quant_layers(model.net).values()} == {PLAIN}
    assert generate_image_tokens(model, "a cat", top_k=1).shape == (1, 576)


# --- quantized models ------------------------------------------------------------------------------------------


# Measured on janus-pro-tiny in float32 (relative L2 error of the guided logits per step, mean; top-1 agreement):
# int8 0.022 / 0.94, int4 0.30 / 0.43 (hidden size 64, random weights, cfg 5 amplifies every error by ~5x).
@pytest.mark.parametrize(("mode", "max_error", "min_top1"), [("int8", 0.05, 0.85), ("int4", 0.4, 0.3)])
def test_quantized_tiny_model_stays_near_the_golden(mode, max_error, min_top1):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize=mode)
    assert model.quantization == mode
    error, top1 = relative_error_and_top1(teacher_forced_cfg_logits(model),
                                          golden(PRO_TINY, "ar_teacher_forced")["cfg_logits"])
    assert error < max_error and top1 >= min_top1


def relative_error_and_top1(got: torch.Tensor, expect: torch.Tensor) -> tuple[float, float]:
    """(mean over positions of the relative L2 error of ``got [..., V]``, fraction of equal argmaxes)."""
    got, expect = got.float(), expect.float()
    error = float(((got - expect).norm(dim=-1) / expect.norm(dim=-1)).mean())
    return error, float((got.argmax(-1) == expect.argmax(-1)).float().mean())


# Measured on the tiny fixtures in float32 (relative L2 error of the answer's logits per step, mean; top-1
# agreement): int8 0.013 / 1.0 on both, int4 0.20 / 0.45-0.5. The greedy int8 answer is the golden one.
@pytest.mark.parametrize("folder", [PRO_TINY, FLOW_TINY], ids=["pro", "flow"])
@pytest.mark.parametrize(("mode", "max_error", "min_top1"), [("int8", 0.03, 0.9), ("int4", 0.3, 0.3)])
def test_quantized_understanding_stays_near_the_golden(folder, mode, max_error, min_top1):
    model = janus_core.load_model(folder, device="cpu", dtype=torch.float32, quantize=mode)
    gold = golden(folder, "understanding")
    image = Image.open(IMAGE_PATH).convert("RGB")
    got = teacher_forced_answer_logits(model, image, "Describe this image.", gold["generated_ids"])
    error, top1 = relative_error_and_top1(got, gold["step_logits"])
    assert error < max_error and top1 >= min_top1
    if mode == "int8":
        answer = janus_core.understand(model, [image], "Describe this image.", max_new_tokens=20)
        info = json.loads((folder / "golden" / "understanding.json").read_text(encoding="utf-8"))
        assert answer == [info["generated_text"]]


# Janus-4o instruction editing (the image's VQ tokens in the prompt, three CFG rows), against the golden of the
# original code. Measured in float32: int8 0.019 / 0.975, int4 0.33 / 0.43.
@pytest.mark.parametrize(("mode", "max_error", "min_top1"), [("int8", 0.04, 0.85), ("int4", 0.45, 0.3)])
def test_quantized_editing_stays_near_the_golden(mode, max_error, min_top1):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize=mode)
    gold = golden(PRO_TINY, "edit_teacher_forced")
    meta = json.loads((PRO_TINY / "golden" / "edit_teacher_forced.json").read_text(encoding="utf-8"))
    image = Image.open(IMAGE_PATH)
    scores = score_image_tokens(model, meta["instruction"], gold["tokens"], cfg_weight=meta["cfg_weight"],
                                image=image, image_cfg_weight=meta["cfg_weight2"])
    error, top1 = relative_error_and_top1(scores[0, gold["kept_steps"]], gold["mixed_logits"][:, 0])
    assert error < max_error and top1 >= min_top1
    edited = generate_image_tokens(model, meta["instruction"], image=image, image_cfg_weight=2.0, seed=4,
                                   batch_size=2)
    assert edited.shape == (2, 576) and 0 <= int(edited.min()) <= int(edited.max()) < model.config.vq.codebook_size
    assert torch.equal(edited, generate_image_tokens(model, meta["instruction"], image=image, image_cfg_weight=2.0,
                                                     seed=4, batch_size=2))


def test_which_layers_are_quantized():
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")
    layers = quant_layers(model.net)
    assert set(layers) == {f"language_model.model.layers.{i}.{n}" for i in range(2) for n in
                           ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} | {
        "language_model.lm_head", "language_model.model.embed_tokens", "gen_head.output_mlp_projector",
        "gen_head.vision_head"}
    floats = {n.rsplit(".", 1)[0].split(".")[0] for n, p in model.net.named_parameters() if p.is_floating_point()}
    assert {"vision_model", "gen_vision_model", "aligner", "gen_aligner", "gen_embed"} <= floats
    assert isinstance(model.net.language_model.model.embed_tokens, QuantEmbedding)
    assert model.net.language_model.model.embed_tokens.weight.dtype == torch.bfloat16  # its compute dtype
    # joined layers hold q/k/v and gate/up; the runner re-joins the placeholder parts into one matmul
    attn = model.net.language_model.model.layers[0].self_attn
    assert attn.qkv_proj.parts == (64, 32, 32) and attn.q_proj.weight.shape == (64, 64)
    weights = janus_core.llm.LayerWeights.of(model.net.language_model.model.layers[0])
    assert weights.qkv is not None and weights.gate_up is not None
    no_lm_head = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int8",
                                       quantize_lm_head=False, quantize_embeddings=False)
    assert no_lm_head.net.language_model.lm_head.weight.dtype == torch.bfloat16
    assert no_lm_head.net.language_model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert set(quant_layers(no_lm_head.net)) == set(layers) - {"language_model.lm_head",
                                                               "language_model.model.embed_tokens"}


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.01), ("int4", 0.12)])
def test_quantized_embedding_looks_up_dequantized_rows(mode, tolerance):
    """The table is stored like a linear weight (a row per token) and a lookup dequantizes only those rows."""
    table = torch.randn(300, 256, generator=torch.Generator().manual_seed(5))
    layer = quantize_modules(nn.ModuleDict({"language_model": nn.ModuleDict({"model": nn.ModuleDict(
        {"embed_tokens": nn.Embedding(300, 256)})})}), mode, [EMBEDDINGS])[f"{EMBEDDINGS}.weight"].module
    qweight, qscale = formats.quantize(table, mode)
    layer.set_weight(qweight, qscale, PLAIN, None)
    layer.prepare(torch.bfloat16)
    ids = torch.tensor([[5, 299, 0], [5, 7, 120]])
    got = layer(ids)
    assert got.shape == (2, 3, 256) and got.dtype == torch.bfloat16
    expect = formats.dequantize(qweight, qscale, mode)[ids]
    torch.testing.assert_close(got.float(), expect, rtol=8e-3, atol=1e-6)  # bf16 rounding only
    error = (got.float() - table[ids]).norm(dim=-1) / table[ids].norm(dim=-1)
    assert float(error.max()) < tolerance
    with pytest.raises(IndexError):
        layer(torch.tensor([300]))


def test_state_dict_reports_the_quantized_size():
    """ComfyUI sizes a model from its state dict (comfy.model_management.module_size): the packed bytes."""
    full = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    int4 = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")

    def size(net):
        return sum(t.numel() * t.element_size() for t in net.state_dict().values())

    layers = quant_layers(int4.net).values()
    quantized = sum(formats.stored_bytes("int4", m.out_features, m.in_features) for m in layers)
    full_size = sum(m.out_features * m.in_features * 2 for m in layers)
    assert size(int4.net) == size(full.net) - full_size + quantized


def test_quantized_flow_model_keeps_the_uvit_in_float():
    model = janus_core.load_model(FLOW_TINY, device="cpu", dtype=torch.float32, quantize="int8")
    names = set(quant_layers(model.net))
    assert names and all(n.startswith("language_model.") for n in names)
    for part in ("vision_gen_enc_model", "vision_gen_dec_model", "vision_und_enc_model"):
        assert all(p.dtype == torch.float32 for p in getattr(model.net, part).parameters())
    reference = janus_core.load_model(FLOW_TINY, device="cpu", dtype=torch.float32)
    a = janus_core.generate_flow_latents(model, "a cat", steps=2, seed=3)
    b = janus_core.generate_flow_latents(reference, "a cat", steps=2, seed=3)
    assert torch.isfinite(a).all() and float((a - b).norm() / b.norm()) < 0.05


@pytest.mark.parametrize("stream", [False, True])
def test_row_blocks_read_the_same_values(monkeypatch, tmp_path, stream):
    """Source weights are quantized from blocks of rows (a 0.8 GB lm_head is never read whole)."""
    from janus_core import checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)
    folder = tmp_path / "bin"
    shutil.copytree(PRO_TINY, folder, ignore=shutil.ignore_patterns("golden", "*.safetensors"))
    from safetensors.torch import load_file

    whole = load_file(str(PRO_TINY / "model.safetensors"))
    torch.save(whole, folder / "pytorch_model.bin")
    for source in (PRO_TINY, folder):
        seen = 0
        for name, blocks in checkpoint.iter_checkpoint(source, stream=stream, by_rows=lambda n: n.endswith("weight")):
            if isinstance(blocks, checkpoint.RowBlocks):
                parts = list(blocks)
                assert [first for first, _ in parts] == sorted({first for first, _ in parts})
                assert torch.equal(torch.cat([block for _, block in parts]), whole[name]), name
                seen += len(parts) > 1
        assert seen > 10


def test_bin_checkpoint_quantizes_like_safetensors(tmp_path):
    """.bin sources are streamed (memory-mapped, pages given back): same result as the safetensors file."""
    folder = tmp_path / "bin"
    shutil.copytree(PRO_TINY, folder, ignore=shutil.ignore_patterns("golden", "*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(str(PRO_TINY / "model.safetensors")), folder / "pytorch_model.bin")
    a = janus_core.load_model(folder, device="cpu", dtype=torch.float32, quantize="int4").net.state_dict()
    b = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize="int4").net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_stay_canonical_until_they_reach_their_compute_device():
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4",
                                  compute_device="meta")
    assert {m.layout for m in quant_layers(model.net).values()} == {PLAIN}
    with torch.inference_mode():  # ComfyUI runs nodes, and so the handle's ready(), in inference mode
        model.pack_projections()  # what the ComfyUI handle does after moving the weights
        tokens = generate_image_tokens(model, "a cat", top_k=1)
    assert kernel_for(CPU, "int4", torch.bfloat16).layout in {m.layout for m in quant_layers(model.net).values()}
    direct = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")
    assert torch.equal(tokens, generate_image_tokens(direct, "a cat", top_k=1))


def test_weights_packed_for_another_device_are_refused():
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16, quantize="int4")
    layer: QuantLinear = model.net.language_model.model.layers[0].mlp.gate_up_proj
    layer.layout = TILED_INT4  # as if packed on a GPU and moved here
    with pytest.raises(CheckpointError, match="packed for the tiled-int4 kernel"):
        model.pack_projections()


# --- quantized folders -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory):
    return save_quantized(PRO_TINY, tmp_path_factory.mktemp("quant") / "janus-pro-tiny-int4", "int4")


def test_saved_folder_reloads_identically(int4_folder):
    assert read_quantization(int4_folder).mode == "int4"
    assert not (int4_folder.parent / (int4_folder.name + ".partial")).exists()
    direct = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.float32, quantize="int4")
    saved = janus_core.load_model(int4_folder, device="cpu", dtype=torch.float32)
    again = janus_core.load_model(int4_folder, device="cpu", dtype=torch.float32, quantize="int4")
    a, b = direct.net.state_dict(), saved.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.quantization == "int4"
    assert torch.equal(teacher_forced_cfg_logits(direct), teacher_forced_cfg_logits(saved))


def test_saving_refuses_existing_and_quantized_folders(int4_folder, tmp_path):
    with pytest.raises(JanusError, match="already exists"):
        save_quantized(PRO_TINY, int4_folder, "int4")
    with pytest.raises(JanusError, match="already a quantized folder"):
        save_quantized(int4_folder, tmp_path / "twice", "int8")


@pytest.mark.parametrize("leftover", ["file", "symlink", "download"])
def test_saving_never_deletes_a_partial_name_it_did_not_make(tmp_path, leftover):
    out = tmp_path / "q"
    partial = tmp_path / "q.partial"
    if leftover == "file":
        partial.write_text("not ours")
    elif leftover == "symlink":
        (tmp_path / "elsewhere").mkdir()
        partial.symlink_to(tmp_path / "elsewhere")
    else:  # an unfinished hub download of the same name
        (partial / ".cache").mkdir(parents=True)
        (partial / "config.json").write_text("{}")
    with pytest.raises(JanusError, match=r"q\.partial exists and is not a folder an earlier quantize run left"):
        save_quantized(PRO_TINY, out, "int8")
    assert partial.is_symlink() or partial.is_file() or (partial / "config.json").read_text() == "{}"
    assert not out.exists()


def test_saving_replaces_its_own_interrupted_run(tmp_path, monkeypatch):
    from janus_core.quant import folder as quant_folder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(quant_folder.shutil, "copyfile", interrupted)  # after the weights, before the side files
        with pytest.raises(KeyboardInterrupt):
            save_quantized(PRO_TINY, tmp_path / "q", "int8")
    assert (tmp_path / "q.partial" / "model.safetensors").is_file()
    assert read_quantization(save_quantized(PRO_TINY, tmp_path / "q", "int8")).mode == "int8"
    assert not (tmp_path / "q.partial").exists() and not (tmp_path / "q" / ".janus-quantize").exists()


def test_quantized_folder_with_another_option_is_refused(int4_folder):
    with pytest.raises(JanusError, match="holds int4 weights.*cannot be loaded as int8"):
        janus_core.load_model(int4_folder, device="cpu", quantize="int8")


def doctored(folder, tmp_path, edit_record=None, edit_tensors=None):
    """A copy of the quantized ``folder`` with its janus_quantization.json / tensors edited."""
    copy = tmp_path / "doctored"
    shutil.copytree(folder, copy)
    if edit_record is not None:
        record = json.loads((copy / QUANT_FILE).read_text())
        edit_record(record)
        (copy / QUANT_FILE).write_text(json.dumps(record))
    if edit_tensors is not None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(copy / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(copy / "model.safetensors"))
    return copy


def test_quantizing_the_uvit_is_refused(tmp_path):
    folder = save_quantized(FLOW_TINY, tmp_path / "flow-int8", "int8")
    copy = doctored(folder, tmp_path, lambda r: r["modules"].append("vision_gen_dec_model.blocks.0.attn.qkv"))
    with pytest.raises(CheckpointError, match="JanusFlow's UViT, which is never quantized"):
        janus_core.load_model(copy, device="cpu")


@pytest.mark.parametrize(("edit", "phrase"), [
    (lambda r: r.update(mode="int3"), "mode is 'int3'"),
    (lambda r: r.update(version=7), "version 7 of the quantized format"),
    (lambda r: r.update(modules=["gen_embed"]), "not one of the layers"),
    (lambda r: r["modules"].append(r["modules"][0]), "modules names 'language_model.*' more than once"),
    (lambda r: r["modules"].pop(0), "quantized layers stored do not match the list in janus_quantization.json"),
])
def test_bad_quantization_record_is_refused(int4_folder, tmp_path, edit, phrase):
    with pytest.raises(CheckpointError, match=phrase):
        janus_core.load_model(doctored(int4_folder, tmp_path, edit), device="cpu")


def test_quantized_weights_without_their_record_are_refused(int4_folder, tmp_path):
    """A quantized folder copied or uploaded without janus_quantization.json is named as such (not as a
    checkpoint of another model), by the loader and by the quantize command."""
    copy = shutil.copytree(int4_folder, tmp_path / "no-record")
    (copy / QUANT_FILE).unlink()
    for attempt in (lambda: janus_core.load_model(copy, device="cpu"),
                    lambda: janus_core.load_model(copy, device="cpu", quantize="int4"),
                    lambda: save_quantized(copy, tmp_path / "again", "int8")):
        with pytest.raises(CheckpointError, match=f"quantized tensors .*qweight.* but no {QUANT_FILE}"):
            attempt()


def test_quantized_tensors_of_the_wrong_dtype_or_count_are_refused(int4_folder, tmp_path):
    name = "language_model.model.layers.0.mlp.down_proj.qweight"

    def to_int8(t):
        t[name] = t[name].to(torch.int8)

    with pytest.raises(CheckpointError, match="down_proj.qweight' is int8, not uint8"):
        janus_core.load_model(doctored(int4_folder, tmp_path / "a", edit_tensors=to_int8), device="cpu")

    def drop_layer(t):
        for key in [k for k in t if k.startswith("language_model.model.layers.1.")]:
            del t[key]

    with pytest.raises(CheckpointError, match="10 missing tensor.*layers.1.mlp.down_proj.qscale"):
        janus_core.load_model(doctored(int4_folder, tmp_path / "b", edit_tensors=drop_layer), device="cpu")

    scale = name.replace("qweight", "qscale")

    def cut_scale(t):
        t[scale] = t[scale][:-1].clone()

    with pytest.raises(CheckpointError) as info:
        janus_core.load_model(doctored(int4_folder, tmp_path / "c", edit_tensors=cut_scale), device="cpu")
    assert f"{scale}: checkpoint" in str(info.value) and "missing" not in str(info.value)  # qweight is there


def test_weight_count_check_knows_quantized_layouts(int4_folder, tmp_path):
    """config.json's weight count is compared with the files in the quantized layout (hardening of #11)."""
    from janus_core.quant.folder import quantized_llm_elements

    model = janus_core.load_model(int4_folder, device="cpu")
    llm = model.net.language_model.state_dict()
    stored = quantized_llm_elements(model.config.llm, "int4", lm_head=True, embeddings=True)
    assert stored == sum(t.numel() for t in llm.values())
    copy = doctored(int4_folder, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["language_config"]["num_hidden_layers"] = 8
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="describes a model of .* weights but the weight files"):
        janus_core.load_model(copy, device="cpu")


def test_unknown_mode_is_refused():
    with pytest.raises(JanusError, match="Unknown quantization 'int2'"):
        janus_core.load_model(PRO_TINY, device="cpu", quantize="int2")


# --- node and command line -------------------------------------------------------------------------------------


def test_loader_node_offers_int8_and_int4_after_the_old_choices():
    from nodes.loader import DSJanusModelLoader
    from tests.conftest import node_model

    choices = DSJanusModelLoader.INPUT_TYPES()["required"]["dtype"][0]
    assert choices == ["auto", "bf16", "fp16", "fp32", "int8", "int4"]  # old workflows' values stay valid
    handle = node_model(PRO_TINY, dtype="int8")
    assert handle.model.quantization == "int8" and handle.model.dtype == torch.bfloat16  # auto on the CPU
    assert handle.ready().quantization == "int8"


def test_command_line_quantizes_and_loads(tmp_path, capsys, caplog):
    from janus_core.cli import main

    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(PRO_TINY), "--dtype", "int8", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and read_quantization(out).mode == "int8"
    assert main(["generate", "--model", str(out), "--prompt", "a cat", "--top-k", "1", "--device", "cpu",
                 "--out", str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "janus_0.png").is_file()
    assert main(["generate", "--model", str(out), "--prompt", "a cat", "--dtype", "int4", "--device", "cpu",
                 "--out", str(tmp_path / "images")]) == 2
    assert "holds int8 weights" in caplog.text


def test_command_line_keeps_lm_head_and_embeddings_when_asked(tmp_path):
    from janus_core.cli import main

    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(PRO_TINY), "--dtype", "int4", "--out", str(out), "--keep-lm-head",
                 "--keep-embeddings"]) == 0
    record = read_quantization(out)
    assert not record.lm_head and not record.embeddings
    model = janus_core.load_model(out, device="cpu", dtype=torch.bfloat16)
    assert model.net.language_model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(model.net.language_model.model.embed_tokens, nn.Embedding)
    from safetensors.torch import load_file

    stored = load_file(str(PRO_TINY / "model.safetensors"))["language_model.model.embed_tokens.weight"]
    assert torch.equal(model.net.language_model.model.embed_tokens.weight, stored.bfloat16())
