"""Language-model weights packed for oneDNN's CPU matmul: the capability decision, packing without a second copy,
exact unpacking, and the guards against reading or moving stand-ins.

The plumbing runs everywhere with a stand-in "oneDNN" (a plain matmul behind the same two ops); the real packing
is checked where this CPU can do it (AVX-512 or AVX-NE-CONVERT; CPUs without it are covered by the refusal tests).
"""

import logging

import pytest
import torch

import janus_core
from janus_core import cpu_packed
from janus_core.errors import JanusError
from janus_core.llm import CPU_PACKED_ATTR, LayerWeights, cpu_pack_layers, cpu_unpack_layers
from tests.conftest import PRO_TINY, golden, teacher_forced_cfg_logits

REAL_PACKING = cpu_packed.can_pack(torch.bfloat16)


class _Opaque:
    """What the fake reorder returns: a copy of the weight, readable only through ``to_dense``."""

    def __init__(self, weight: torch.Tensor):
        self._weight = weight.clone()

    def to_dense(self) -> torch.Tensor:
        return self._weight.clone()


def _fake_ops():
    def reorder(weight, rows_hint):
        assert rows_hint == cpu_packed.ROWS_HINT
        return _Opaque(weight)

    def run(x, packed, bias, attr, scalars, algorithm):
        return x @ packed._weight.t()

    return reorder, run


@pytest.fixture(autouse=True)
def _fresh_decision():
    cpu_packed.can_pack.cache_clear()
    yield
    cpu_packed.can_pack.cache_clear()


@pytest.fixture
def fake_onednn(monkeypatch):
    monkeypatch.setattr(cpu_packed, "_ops", _fake_ops)


def layers(model):
    return model.net.language_model.model.layers


def tokens(model, seed: int = 3) -> torch.Tensor:
    return janus_core.generate_image_tokens(model, "a red fox", batch_size=2, seed=seed)


def test_only_bf16_is_packed():
    assert not cpu_packed.can_pack(torch.float32) and not cpu_packed.can_pack(torch.float16)


def test_a_torch_without_the_ops_does_not_pack(monkeypatch):
    monkeypatch.setattr(cpu_packed, "_ops", lambda: None)
    assert not cpu_packed.can_pack(torch.bfloat16)
    with pytest.raises(JanusError, match="no oneDNN weight packing"):
        cpu_packed.pack(torch.zeros(4, 4, dtype=torch.bfloat16))


def test_a_cpu_onednn_refuses_does_not_pack(monkeypatch, caplog):
    def refusing_reorder(weight, rows_hint):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw")

    monkeypatch.setattr(cpu_packed, "_ops", lambda: (refusing_reorder, _fake_ops()[1]))
    with caplog.at_level(logging.INFO, logger="janus_core.cpu_packed"):
        assert not cpu_packed.can_pack(torch.bfloat16)
    assert "cannot pack" in caplog.text and "avx512bw" in caplog.text


def test_a_packed_matmul_that_disagrees_is_not_used(monkeypatch, caplog):
    reorder, run = _fake_ops()
    monkeypatch.setattr(cpu_packed, "_ops", lambda: (reorder, lambda *a: run(*a) * 1.1))
    with caplog.at_level(logging.WARNING, logger="janus_core.cpu_packed"):
        assert not cpu_packed.can_pack(torch.bfloat16)
    assert "disagrees" in caplog.text


def test_packing_replaces_the_plain_weights_and_unpacks_exactly(fake_onednn):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    plain = tokens(model)  # the first forward packs
    assert all(CPU_PACKED_ATTR in layer.__dict__ for layer in layers(model))
    for layer in layers(model):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            weight = layer.get_submodule(name).weight
            assert cpu_packed.is_stand_in(weight) and weight.untyped_storage().nbytes() <= weight.element_size()
    # ComfyUI sizes a model from its state dict: the stand-ins keep every shape and dtype
    state = model.net.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}
    assert torch.equal(tokens(model), plain)  # packed from the first step on: the same tokens again
    assert cpu_unpack_layers(model.net.language_model) == len(layers(model))
    after = model.net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    weights = LayerWeights.of(layers(model)[0])
    assert weights.qkv is not None and weights.gate_up is not None  # joined again
    assert cpu_unpack_layers(model.net.language_model) == 0


def test_quantized_and_float32_layers_stay_as_they_are(fake_onednn):
    for kwargs in ({"dtype": torch.float32}, {"dtype": torch.bfloat16, "quantize": "int8"}):
        model = janus_core.load_model(PRO_TINY, device="cpu", **kwargs)
        assert cpu_pack_layers(model.net.language_model) == 0


def test_a_compiling_runner_keeps_plain_weights(fake_onednn):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    model.llm.compile = True
    model.llm.prepare_weights()
    assert not any(CPU_PACKED_ATTR in layer.__dict__ for layer in layers(model))


def test_moving_the_model_unpacks_first(fake_onednn):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    tokens(model)
    moved = []
    real_to = model.net.to

    def recording_to(device):
        moved.append([CPU_PACKED_ATTR in layer.__dict__ for layer in layers(model)])
        return real_to(device)

    model.net.to = recording_to
    model.to("meta")
    assert moved == [[False] * len(layers(model))]


def test_moving_packed_weights_behind_the_models_back_is_an_error(fake_onednn):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    tokens(model)
    model.net.to("meta")  # e.g. net.to("cuda"): the stand-ins' zeros would arrive as weights
    with pytest.raises(JanusError, match="packed for the CPU.*JanusModel.to"):
        LayerWeights.of(layers(model)[0])


def test_stand_ins_without_packed_weights_are_an_error(fake_onednn):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    cpu_pack_layers(model.net.language_model)
    del layers(model)[0].__dict__[CPU_PACKED_ATTR]
    with pytest.raises(JanusError, match="stand-ins"):
        LayerWeights.of(layers(model)[0])


@pytest.mark.skipif(not REAL_PACKING, reason="oneDNN cannot pack bf16 weights on this CPU (no AVX512 / AVX-NE-CONVERT)")
def test_real_packing_matches_the_plain_matmul_and_the_golden(monkeypatch):
    model = janus_core.load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    packed_tokens = tokens(model)
    assert all(CPU_PACKED_ATTR in layer.__dict__ for layer in layers(model))
    packed_logits = teacher_forced_cfg_logits(model)
    cpu_unpack_layers(model.net.language_model)
    monkeypatch.setattr(cpu_packed, "can_pack", lambda dtype: False)
    assert torch.equal(tokens(model), packed_tokens)
    plain_logits = teacher_forced_cfg_logits(model)
    torch.testing.assert_close(packed_logits, plain_logits, rtol=1e-2, atol=1e-2)
    expect = golden(PRO_TINY, "ar_teacher_forced")["cfg_logits"].float()
    error = float(((packed_logits.float() - expect).norm(dim=-1) / expect.norm(dim=-1)).mean())
    assert error < 0.05
