"""Checkpoint loading in every on-disk layout, and clear errors for broken folders."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from janus_core import load_model
from janus_core.checkpoint import SAFETENSORS_DTYPES, iter_checkpoint, weight_files
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


# --- the safetensors reader: own header parsing, plain file I/O into fresh tensors ---------------------------

EXPECTED_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    EXPECTED_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
if hasattr(torch, "float8_e5m2"):
    EXPECTED_DTYPES["F8_E5M2"] = torch.float8_e5m2


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t``, so NaN payloads and signed zeros compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (valid 0/1 values for bool)."""
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def read_all(folder: Path) -> list[tuple[str, torch.Tensor]]:
    return list(iter_checkpoint(folder))


def write_raw(folder: Path, header: dict, data: bytes) -> Path:
    """A hand-built ``model.safetensors`` in ``folder``: header dict exactly as given, then ``data``."""
    folder.mkdir(exist_ok=True)
    blob = json.dumps(header).encode()
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_dtype_table():
    assert SAFETENSORS_DTYPES == EXPECTED_DTYPES


@pytest.mark.parametrize("dtype_name", sorted(EXPECTED_DTYPES))
def test_every_dtype_round_trips_bit_exactly(tmp_path, dtype_name):
    dtype = EXPECTED_DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(len(dtype_name))
    tensors = {
        "matrix": random_tensor(dtype, (5, 7), gen),
        "scalar": random_tensor(dtype, (), gen),
        "empty": random_tensor(dtype, (0, 3), gen),
        "cube": random_tensor(dtype, (2, 3, 4), gen),
    }
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = dict(read_all(tmp_path))
    assert got.keys() == tensors.keys()
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert got[name].device.type == "cpu"
        assert torch.equal(bits(got[name]), bits(want)), name


def test_mixed_dtypes_match_safetensors_own_reader(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t_{name.lower()}": random_tensor(dtype, (3, 1 + i), gen) for i, (name, dtype)
               in enumerate(EXPECTED_DTYPES.items())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reference = load_file(str(tmp_path / "model.safetensors"))
    got = dict(read_all(tmp_path))
    assert got.keys() == reference.keys()
    for name, want in reference.items():
        assert got[name].dtype == want.dtype and torch.equal(bits(got[name]), bits(want)), name


def test_tensors_come_in_file_offset_order_at_any_alignment(tmp_path):
    # header lists b, a, c; the data holds c (3 bytes, so a and b are unaligned), then b, then a
    c = torch.tensor([1, -2, 3], dtype=torch.int8)
    b = torch.tensor([[1.5, -0.0], [float("inf"), 2.25]], dtype=torch.bfloat16)
    a = torch.tensor(3.25, dtype=torch.float32)
    data = b"".join(bytes(bits(t).numpy()) for t in (c, b, a))
    header = {
        "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [3, 11]},
        "a": {"dtype": "F32", "shape": [], "data_offsets": [11, 15]},
        "c": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
    }
    write_raw(tmp_path, header, data)
    got = read_all(tmp_path)
    assert [n for n, _ in got] == ["c", "b", "a"]
    for (_, t), want in zip(got, (c, b, a), strict=True):
        assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(bits(t), bits(want))


def test_metadata_is_ignored(tmp_path):
    tensors = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt", "note": "hello"})
    got = dict(read_all(tmp_path))
    assert list(got) == ["w"] and torch.equal(got["w"], tensors["w"])
    # also when __metadata__ is not the first key
    header = {"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "__metadata__": {"format": "pt"}}
    write_raw(tmp_path / "raw", header, b"\x07\x09")
    assert [(n, t.tolist()) for n, t in read_all(tmp_path / "raw")] == [("w", [7, 9])]


def test_unknown_dtype_is_named(tmp_path):
    write_raw(tmp_path, {"weird.weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(CheckpointError, match=r"'weird\.weight' has dtype 'Q9'"):
        read_all(tmp_path)


@pytest.mark.parametrize(("shape", "offsets"), [([2, 3], [0, 20]), ([2, 3], [0, 28]), ([], [0, 0]), ([0], [0, 4])])
def test_data_offsets_must_match_shape(tmp_path, shape, offsets):
    write_raw(tmp_path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, bytes(32))
    with pytest.raises(CheckpointError, match=r"corrupt: tensor 'w'"):
        read_all(tmp_path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (["not", "a", "dict"], "corrupt header"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "invalid data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1]}}, "invalid data_offsets"),
        ({"w": 3}, "corrupt header"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            "overlap",
        ),
    ],
)
def test_corrupt_headers(tmp_path, header, message):
    write_raw(tmp_path, header, bytes(8))
    with pytest.raises(CheckpointError, match=message):
        read_all(tmp_path)


def test_garbage_header(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff{[x" + bytes(16))
    with pytest.raises(CheckpointError, match="corrupt header"):
        read_all(tmp_path)


@pytest.mark.parametrize(
    ("cut", "message"),
    [(5, r"truncated \(5 bytes\)"), (20, "truncated or not a safetensors file"), (-1, "truncated: .* expected")],
)
def test_truncated_files(tmp_path, cut, message):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(3, dtype=torch.int64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=message):
        read_all(tmp_path)


def test_file_shrinking_while_read_is_a_short_read_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(1024), "b": torch.ones(1024)}, str(path))
    reader = iter_checkpoint(tmp_path)
    next(reader)
    os.truncate(path, path.stat().st_size - 100)  # the second tensor now ends past the end of the file
    with pytest.raises(CheckpointError, match=r"truncated: tensor '.' .*Re-download"):
        next(reader)


def test_big_endian_machine_is_refused(tmp_path, monkeypatch):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(CheckpointError, match="little-endian"):
        read_all(tmp_path)


@pytest.mark.filterwarnings("error")
def test_tensors_are_fresh_writable_and_unshared():
    got = read_all(PRO_TINY)
    assert len(got) > 10
    storages = [t.untyped_storage() for _, t in got]
    assert len({s.data_ptr() for s in storages if s.nbytes()}) == sum(1 for s in storages if s.nbytes())
    for (name, t), s in zip(got, storages, strict=True):
        assert t.is_contiguous() and t.storage_offset() == 0 and s.nbytes() == t.nbytes, name
    for _, t in got:
        bits(t).fill_(0xA5)  # in place, through every dtype (bf16 included)
    assert all(bool((bits(t) == 0xA5).all()) for _, t in got)
    # the file and a fresh read are untouched by the writes
    fresh = dict(read_all(PRO_TINY))
    for name, want in stored().items():
        assert torch.equal(bits(fresh[name]), bits(want)), name


def _mapped_paths() -> str:
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps")
    return maps.read_text()


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_files_are_not_memory_mapped(tmp_path, layout):
    if layout == "safetensors":
        shutil.copy(PRO_TINY / "model.safetensors", tmp_path / "model.safetensors")
        path = tmp_path / "model.safetensors"
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(stored(), path)
    reader = iter_checkpoint(tmp_path)
    held = [next(reader)]
    assert str(path) not in _mapped_paths()
    held.extend(reader)
    assert len(held) == len(stored())


RSS_PROBE = textwrap.dedent("""
    import os, sys
    from janus_core.checkpoint import iter_checkpoint

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    base = rss()
    out = {name: t.float() for name, t in iter_checkpoint(sys.argv[1])}
    print((peak() - base) / sum(t.nbytes for t in out.values()))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_bf16_to_fp32_peak_rss_is_about_one_copy(tmp_path):
    # 64 MiB of bf16 in 16 tensors -> 128 MiB of fp32. Reading through a memory map keeps the 64 MiB of
    # file pages resident too (ratio ~1.5); plain reads hold one bf16 tensor at a time (ratio ~1.03).
    gen = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(1 << 21, generator=gen).bfloat16() for i in range(16)},
              str(tmp_path / "model.safetensors"))
    repo = Path(__file__).resolve().parents[1]
    # A fixed glibc mmap threshold returns every freed buffer to the OS at once, so the peak measures what the
    # reader holds rather than how glibc's adaptive threshold happens to fragment the heap.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path)], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    ratio = float(result.stdout.strip().splitlines()[-1])
    assert ratio < 1.25, f"peak RSS grew by {ratio:.2f}x the fp32 weights while converting"


# --- pickles -----------------------------------------------------------------------------------------------

def test_sharded_bin_tensors_match(tmp_path):
    make_sharded_bin(tmp_path)
    got = dict(read_all(tmp_path))
    want = stored()
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].device.type == "cpu" and torch.equal(got[name], t), name


def test_pickle_tensors_are_popped_from_the_loaded_dict(tmp_path, monkeypatch):
    torch.save(stored(), tmp_path / "pytorch_model.bin")
    real_load = torch.load
    calls: list[tuple[dict, dict]] = []

    def spy(*args, **kwargs):
        state = real_load(*args, **kwargs)
        calls.append((kwargs, state))
        return state

    monkeypatch.setattr(torch, "load", spy)
    seen = []
    for name, _ in iter_checkpoint(tmp_path):
        kwargs, state = calls[-1]
        assert name not in state  # the loader's dict no longer references a tensor once handed out
        seen.append(name)
    assert len(calls) == 1 and calls[0][1] == {}
    assert calls[0][0]["weights_only"] is True and calls[0][0]["mmap"] is False
    assert calls[0][0]["map_location"] == "cpu"
    assert seen == list(stored())


def test_pickle_that_is_not_a_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"does not hold a state dict \(found list\)"):
        read_all(tmp_path)


def test_pickle_with_non_tensor_entry(tmp_path):
    torch.save({"a": torch.ones(2), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="entry 'step' is a int, not a tensor"):
        read_all(tmp_path)


def test_truncated_pickle(tmp_path):
    torch.save(stored(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_all(tmp_path)


def test_safetensors_read_straight_into_given_tensors():
    stored_tensors = load_file(PRO_TINY / "model.safetensors")
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    ref = stored_tensors[name]
    buffer = torch.zeros(ref.shape[0] * 2, ref.shape[1], dtype=ref.dtype)
    slot = buffer[ref.shape[0]:]
    wrong_shape = torch.zeros(3, dtype=ref.dtype)
    targets = {name: slot, "language_model.model.norm.weight": wrong_shape}
    seen = dict(iter_checkpoint(PRO_TINY, destination=targets.get))
    assert seen[name] is slot and torch.equal(slot, ref)
    assert torch.equal(buffer[: ref.shape[0]], torch.zeros_like(ref))  # only the slot was written
    norm = seen["language_model.model.norm.weight"]
    assert norm is not wrong_shape and torch.equal(norm, stored_tensors["language_model.model.norm.weight"])
    assert not wrong_shape.any()  # a destination of another shape is left alone


@pytest.mark.parametrize("chunk", [6, 1000, 64 << 20])
def test_destinations_of_another_dtype_are_converted_in_chunks(monkeypatch, chunk):
    """Chunk sizes that split elements' rows anywhere (6 bytes = 3 bf16 values) give the same values."""
    import janus_core.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "CHUNK_BYTES", chunk)
    stored_tensors = load_file(PRO_TINY / "model.safetensors")
    names = [n for n, t in stored_tensors.items() if t.is_floating_point()][:12]
    targets = {n: torch.full(stored_tensors[n].shape, float("nan"), dtype=torch.float64) for n in names}
    seen = dict(iter_checkpoint(PRO_TINY, destination=targets.get))
    for n in names:
        assert seen[n] is targets[n]
        assert torch.equal(targets[n], stored_tensors[n].to(torch.float64)), n
