"""Checkpoint loading in every on-disk layout, and clear errors for broken folders."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from janus_core import load_model
from janus_core.checkpoint import weight_files
from janus_core.errors import CheckpointError
from tests.conftest import PRO_TINY


def side_files(dst: Path) -> Path:
    """A model folder with PRO_TINY's config/tokenizer files but no weights."""
    dst.mkdir()
    for f in PRO_TINY.glob("*.json"):
        shutil.copy(f, dst / f.name)
    return dst


def stored() -> dict[str, torch.Tensor]:
    return load_file(str(PRO_TINY / "model.safetensors"))


def split(tensors: dict) -> tuple[dict, dict]:
    names = sorted(tensors)
    half = len(names) // 2
    return {k: tensors[k] for k in names[:half]}, {k: tensors[k] for k in names[half:]}


def write_index(folder: Path, name: str, shards: dict[str, dict]) -> None:
    weight_map = {k: shard for shard, tensors in shards.items() for k in tensors}
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_sharded_safetensors(folder: Path) -> None:
    a, b = split(stored())
    shards = {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
    for shard, tensors in shards.items():
        save_file(tensors, str(folder / shard))
    write_index(folder, "model.safetensors.index.json", shards)


def make_sharded_bin(folder: Path) -> None:
    a, b = split(stored())
    shards = {"pytorch_model-00001-of-00002.bin": a, "pytorch_model-00002-of-00002.bin": b}
    for shard, tensors in shards.items():
        torch.save(tensors, folder / shard)
    write_index(folder, "pytorch_model.bin.index.json", shards)


@pytest.fixture(scope="module")
def reference():
    return load_model(PRO_TINY, device="cpu", dtype=torch.float32).net.state_dict()


def assert_same_weights(model, reference) -> None:
    state = model.net.state_dict()
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("layout", ["bin", "sharded_bin", "sharded_safetensors"])
def test_layouts_load_identically(tmp_path, reference, layout):
    folder = side_files(tmp_path / "m")
    if layout == "bin":
        torch.save(stored(), folder / "pytorch_model.bin")
    elif layout == "sharded_bin":
        make_sharded_bin(folder)
    else:
        make_sharded_safetensors(folder)
    model = load_model(folder, device="cpu", dtype=torch.float32)
    assert_same_weights(model, reference)


def test_requested_dtype_without_copies(reference):
    model = load_model(PRO_TINY, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.net.parameters()} == {torch.bfloat16}
    # bf16 on disk -> bf16 in memory, no rounding: identical to the float32 load rounded back
    state = model.net.state_dict()
    assert all(torch.equal(state[k].float(), v) for k, v in reference.items())


def test_fp16_keeps_vq_decoder_and_gen_head_fp32():
    model = load_model(PRO_TINY, device="cpu", dtype=torch.float16)
    assert model.net.gen_vision_model.decoder.conv_in.weight.dtype == torch.float32
    assert model.net.gen_head.vision_head.weight.dtype == torch.float32
    assert model.net.gen_aligner.layers[0].weight.dtype == torch.float16
    from janus_core.generate_ar import build_cfg_pair, cfg_logit_steps, decode_image_tokens, generate_image_tokens

    fp32 = load_model(PRO_TINY, device="cpu", dtype=torch.float32)
    _, half_logits = next(cfg_logit_steps(model, build_cfg_pair(model, "A red cube.")))
    _, full_logits = next(cfg_logit_steps(fp32, build_cfg_pair(fp32, "A red cube.")))
    assert half_logits.dtype == torch.float32
    torch.testing.assert_close(half_logits, full_logits, rtol=0, atol=2e-2 * full_logits.abs().max().item())
    tokens = generate_image_tokens(model, "A red cube.", top_k=1)
    assert torch.isfinite(decode_image_tokens(model, tokens)).all()


def test_pickle_with_code_is_refused(tmp_path):
    folder = side_files(tmp_path / "m")
    tensors = stored()
    tensors["extra"] = torch.nn.Linear(2, 2)  # a module: needs arbitrary unpickling
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_model(folder, device="cpu")


def test_truncated_safetensors(tmp_path):
    folder = side_files(tmp_path / "m")
    data = (PRO_TINY / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder, device="cpu")


def test_missing_shard(tmp_path):
    folder = side_files(tmp_path / "m")
    make_sharded_safetensors(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors.*missing"):
        weight_files(folder)


def test_no_weights(tmp_path):
    folder = side_files(tmp_path / "m")
    with pytest.raises(CheckpointError, match="No weights found"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("gen_head.vision_head.bias"), r"missing tensor\(s\): gen_head.vision_head.bias"),
        (lambda t: t.__setitem__("aligner.layers.0.weight", torch.zeros(3, 3)), "wrong shape"),
        (lambda t: t.__setitem__("surprise.weight", torch.zeros(1)), r"unknown tensor\(s\): surprise.weight"),
    ],
)
def test_mismatched_tensors_are_named(tmp_path, edit, message):
    folder = side_files(tmp_path / "m")
    tensors = stored()
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, device="cpu")


def test_unused_stored_tensors_are_dropped_knowingly():
    names = set(stored())
    model_keys = set(load_model(PRO_TINY, device="cpu", dtype=torch.float32).net.state_dict())
    extra = names - model_keys
    assert extra and all("attn_pool" in k or k.endswith("quantize.codebook_used") for k in extra)


def test_tokenizer_without_image_tokens(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(PRO_TINY, folder, ignore=shutil.ignore_patterns("golden"))
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<image_placeholder>"]
    tok["model"]["vocab"].pop("<image_placeholder>", None)
    (folder / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(CheckpointError, match="lacks the special token '<image_placeholder>'"):
        load_model(folder, device="cpu")


def test_missing_tokenizer(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(PRO_TINY, folder, ignore=shutil.ignore_patterns("golden", "tokenizer.json"))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_model(folder, device="cpu")
