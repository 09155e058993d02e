"""Joined q/k/v and gate/up weights, and the runner's reusable work buffers.

Loading stores each LLM layer's q/k/v and gate/up weights back to back (one matmul per group); the values and
state-dict keys must stay the checkpoint's, the packed forward must equal the per-projection one, and a device
move must not leave stale or un-joined weights behind.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from janus_core import cpu_packed, load_model, precision
from janus_core.llm import (
    CPU_PACKED_ATTR,
    KVCache,
    LayerWeights,
    cpu_unpack_layers,
    decoder_layer,
    joined_weight,
    pack_projections,
    work_buffer_bytes,
)
from nodes.loader import JanusModelHandle
from tests.conftest import PRO_TINY

SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "preprocessor_config.json", "processor_config.json")
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def layers(model):
    return model.net.language_model.model.layers


def is_packed(model) -> bool:
    weights = [LayerWeights.of(layer) for layer in layers(model)]
    return all(w.qkv is not None and w.gate_up is not None for w in weights)


def unpack(model) -> None:
    """Give every projection its own memory, as a per-parameter device move does (after undoing the packing for
    the CPU's matmul, which a device move needs first)."""
    cpu_unpack_layers(model.net.language_model)
    for layer in layers(model):
        for group in GROUPS:
            for name in group:
                module = layer.get_submodule(name)
                module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def hidden_states(model, seed: int = 0) -> torch.Tensor:
    runner = model.llm
    embeds = torch.randn(2, 8, model.config.llm.hidden_size, generator=torch.Generator().manual_seed(seed))
    embeds = embeds.to(model.dtype)
    cache = KVCache.allocate(runner, 2, 16)
    runner.forward(embeds[:, :7], cache)  # a prompt, then one decode step
    return runner.forward(embeds[:, 7:], cache)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_packs_with_the_stored_values(tmp_path, layout, dtype):
    folder = PRO_TINY
    if layout == "bin":
        folder = tmp_path / "m"
        folder.mkdir()
        for name in SIDE_FILES:
            shutil.copy(PRO_TINY / name, folder / name)
        torch.save(load_file(PRO_TINY / "model.safetensors"), folder / "pytorch_model.bin")
    model = load_model(folder, device="cpu", dtype=dtype)
    assert is_packed(model)
    stored = load_file(PRO_TINY / "model.safetensors")
    state = model.net.state_dict()
    for name, value in state.items():
        assert torch.equal(value, stored[name].to(value.dtype)), name
    q = layers(model)[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == layers(model)[0].self_attn.v_proj.weight.untyped_storage().data_ptr()


def test_joined_weight_needs_adjacent_parts():
    buffer = torch.arange(24.0).view(6, 4)
    a, b, c = buffer[:2], buffer[2:3], buffer[3:]
    assert torch.equal(joined_weight((a, b, c)), buffer)
    assert joined_weight((a, c)) is None  # a gap
    assert joined_weight((b, a)) is None  # wrong order
    assert joined_weight((a, b.clone())) is None  # another buffer
    assert joined_weight((a, buffer[2:4, :2])) is None  # not a full-width slice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_equals_per_projection_forward(dtype):
    model = load_model(PRO_TINY, device="cpu", dtype=dtype)
    packed = hidden_states(model)
    unpack(model)
    assert not is_packed(model)
    separate = hidden_states(model)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(packed, separate, **tol)


def test_pack_projections_rejoins_after_a_move():
    model = load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    assert pack_projections(model.net.language_model) == 0  # already packed
    unpack(model)
    model.to("cpu")  # JanusModel.to re-joins what a move (here: the clones) separated
    assert is_packed(model)
    assert pack_projections(model.net.language_model) == 0
    after = model.net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_node_handle_rejoins_when_ready():
    model = load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    handle = JanusModelHandle(model, torch.device("cpu"))
    unpack(model)
    with torch.inference_mode():  # as ComfyUI runs nodes
        assert handle.ready() is model
    assert is_packed(model)


def test_forward_output_is_not_a_reused_buffer():
    model = load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    runner = model.llm
    cache = KVCache.allocate(runner, 2, 40)
    first = runner.forward(torch.randn(2, 9, model.config.llm.hidden_size), cache)
    kept = first.clone()
    runner.forward(torch.randn(2, 9, model.config.llm.hidden_size), cache)
    assert torch.equal(first, kept)


def test_work_buffers_are_reused_and_change_nothing():
    model = load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    runner = model.llm
    spec = model.config.llm
    x = torch.randn(2, 9, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    cache = KVCache.allocate(runner, 2, 40)
    out = runner.forward(x, cache)
    buffers = {name: buf for name, buf in cache.scratch._buffers.items()}
    assert {"x", "h", "qkv", "gate_up", "proj"} <= buffers.keys()
    cache.length = 0  # same shapes again: every buffer is reused, the result is the same
    assert torch.equal(runner.forward(x, cache), out)
    # the very same tensors (identity, not addresses: freed memory could be handed out again)
    assert cache.scratch._buffers.keys() == buffers.keys()
    assert all(cache.scratch._buffers[name] is buf for name, buf in buffers.items())

    # one layer with and without work buffers (the compiled step runs without)
    w = LayerWeights.of(layers(model)[0])
    cos, sin = runner.rope(16)(torch.arange(9))

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    with torch.inference_mode():  # as the runner calls it
        plain = decoder_layer(x.clone(), w, cos, sin, spec.rms_norm_eps, spec.head_dim, attend)
        buffered = decoder_layer(x.clone(), w, cos, sin, spec.rms_norm_eps, spec.head_dim, attend, cache.scratch)
    assert torch.equal(plain, buffered)


@pytest.mark.parametrize("cpu_class", [precision.AMX, precision.NATIVE, precision.EMULATED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_work_buffer_estimate_matches_the_buffers(monkeypatch, dtype, cpu_class):
    """What the nodes announce to ComfyUI's memory manager is what a forward allocates (whatever the matmul form
    the CPU class picks: the float32-chunks form of CPUs without bf16 instructions has more buffers)."""
    monkeypatch.setattr(precision, "local_cpu_class", lambda: cpu_class)
    if cpu_class == precision.EMULATED:  # CPUs without bf16 instructions cannot pack bf16 weights for oneDNN
        monkeypatch.setattr(cpu_packed, "can_pack", lambda dtype: False)
    model = load_model(PRO_TINY, device="cpu", dtype=dtype)
    spec = model.config.llm
    rows, tokens = 2, 9
    cache = KVCache.allocate(model.llm, rows, 16)
    model.llm.forward(torch.randn(rows, tokens, spec.hidden_size).to(dtype), cache)
    held = sum(b.numel() * b.element_size() for b in cache.scratch._buffers.values())
    if CPU_PACKED_ATTR in layers(model)[0].__dict__:  # oneDNN's packed matmuls return new q/k/v, o, gate/up tensors
        q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
        held += rows * tokens * (q + 2 * kv + spec.hidden_size + 2 * spec.intermediate_size) * dtype.itemsize
    attention_output = rows * tokens * spec.num_attention_heads * spec.head_dim * dtype.itemsize
    # the re-laid copy of the attention output exists only when the kernel's output is not token-major
    assert work_buffer_bytes(spec, rows, tokens, dtype) - (held + attention_output) in (0, attention_output)
