"""Malformed, truncated, hostile and mismatched checkpoint folders: every one is refused with a CheckpointError
that names the file and says what to do, before anything big is allocated. Built on the fly from the tiny
fixtures."""

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import janus_core.checkpoint as ckpt
import janus_core.model as model_module
from janus_core import load_model
from janus_core.checkpoint import iter_checkpoint, stored_size, weight_files
from janus_core.errors import CheckpointError, JanusError
from janus_core.model import is_unused_key
from tests.conftest import FLOW_TINY, PRO_TINY
from tests.test_checkpoint import make_sharded_safetensors, side_files, split, stored, write_raw

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def full_copy(dst: Path, src: Path = PRO_TINY) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden", "vae"))
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def no_weights_allocated(monkeypatch) -> None:
    """Make any attempt to fill the network fail the test: refusals must come before loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_weights was reached")
    monkeypatch.setattr(model_module, "load_weights", refuse)


# --- shard indexes: names stay inside the model folder ------------------------------------------------------

@pytest.fixture
def sharded(tmp_path) -> Path:
    folder = side_files(tmp_path / "m")
    make_sharded_safetensors(folder)
    return folder


def point_shard_to(folder: Path, name: str) -> None:
    """Make the index send every tensor of the second shard to ``name``."""
    edit_json(folder / INDEX, lambda index: index["weight_map"].update(
        {k: name for k, v in index["weight_map"].items() if v == SHARD_2}))


@pytest.mark.parametrize("name", [
    f"../outside/{SHARD_2}", f"sub/../../outside/{SHARD_2}", "ABSOLUTE", f"C:/outside/{SHARD_2}", f"C:{SHARD_2}",
    f"..\\outside\\{SHARD_2}", f"\\\\server\\share\\{SHARD_2}", f"\\outside\\{SHARD_2}",
])
def test_index_names_outside_the_folder_are_refused(sharded, name):
    outside = sharded.parent / "outside"
    outside.mkdir()
    shutil.move(sharded / SHARD_2, outside / SHARD_2)  # a real, valid shard waits outside the folder
    point_shard_to(sharded, str(outside / SHARD_2) if name == "ABSOLUTE" else name)
    with pytest.raises(CheckpointError, match=r"outside the model folder.*refused.*re-download"):
        weight_files(sharded)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_model(sharded, device="cpu")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_index_names_through_a_linked_folder_are_refused(sharded):
    outside = sharded.parent / "outside"
    outside.mkdir()
    shutil.move(sharded / SHARD_2, outside / SHARD_2)
    (sharded / "sub").symlink_to(outside, target_is_directory=True)
    point_shard_to(sharded, f"sub/{SHARD_2}")
    with pytest.raises(CheckpointError, match=r"through a symbolic link\) is outside the model folder"):
        weight_files(sharded)


def test_shards_in_a_subfolder_and_linked_shard_files_load(sharded, tmp_path):
    """Relative names inside the folder load; a shard file that is itself a link (how the Hugging Face cache
    stores every file) is the folder's own entry and loads too."""
    (sharded / "shards").mkdir()
    shutil.move(sharded / SHARD_2, sharded / "shards" / SHARD_2)
    point_shard_to(sharded, f"shards/./{SHARD_2}")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.move(sharded / SHARD_1, blobs / "3f2a")
    (sharded / SHARD_1).symlink_to(blobs / "3f2a")
    assert weight_files(sharded) == [sharded / SHARD_1, sharded / "shards" / SHARD_2]
    model = load_model(sharded, device="cpu", dtype=torch.float32)
    assert model.variant == "janus-pro"


@pytest.mark.parametrize(("content", "message"), [
    (b"[1, 2]", "holds a list where an object was expected"),
    (b'{"metadata": {}}', "'weight_map' must be an object .* found null"),
    (b'{"weight_map": ["a"]}', "'weight_map' must be an object .* found a list"),
    (b'{"weight_map": {}}', "found an empty object"),
    (b'{"weight_map": {"a.weight": 5}}', r"names a shard a number 5, not a file name"),
    (b'{"weight_map": {"a.weight": null}}', "names a shard null None, not a file name"),
    (b'{"weight_map": {"a.weight": ""}}', "names a shard a string '', not a file name"),
    (b'{"weight_map": {"a.weight": "pytorch_model.bin"}}', "not a .safetensors file"),
    (b'{"weight_map": {"a.weight": "x\\u0000.safetensors"}}', "not a file name"),
    (b"\xff\xfe{}", "is not UTF-8"),
    (b"{" * 100_000, "(nested too deeply|not valid JSON)"),
    (b"{weight_map", "is not valid JSON"),
])
def test_malformed_indexes(tmp_path, content, message):
    folder = side_files(tmp_path / "m")
    (folder / INDEX).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        weight_files(folder)
    assert INDEX in str(info.value)


def test_nested_json_is_refused_not_a_recursion_error(tmp_path):
    folder = side_files(tmp_path / "m")
    (folder / INDEX).write_bytes(b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(CheckpointError, match=f"{INDEX} is nested too deeply"):
        weight_files(folder)


# --- pytorch_model.bin: empty, garbage, truncated, foreign ---------------------------------------------------

def bin_folder(tmp_path: Path, content: bytes | None = None) -> Path:
    folder = side_files(tmp_path / "m")
    if content is None:
        torch.save(stored(), folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(content)
    return folder


def valid_bin_bytes(tmp_path: Path) -> bytes:
    torch.save(stored(), tmp_path / "valid.bin")
    return (tmp_path / "valid.bin").read_bytes()


@pytest.mark.parametrize(("make", "message"), [
    (lambda valid: b"", r"pytorch_model.bin is empty \(0 bytes\)"),
    (lambda valid: b"\x00garbage" * 100, "is not a complete torch.save archive"),
    (lambda valid: valid[: len(valid) // 2], "is not a complete torch.save archive"),
    (lambda valid: valid[:-1], "is not a complete torch.save archive"),
    (lambda valid: valid[:100], "is not a complete torch.save archive"),
])
def test_broken_bin_files(tmp_path, make, message):
    folder = bin_folder(tmp_path, make(valid_bin_bytes(tmp_path)))
    with pytest.raises(CheckpointError, match=f"{message}.*re-download it") as info:
        list(iter_checkpoint(folder))
    assert "pytorch_model.bin" in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, device="cpu")


def test_legacy_and_foreign_zip_files(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"a": torch.ones(2)}, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a complete torch.save archive"):
        list(iter_checkpoint(legacy))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with zipfile.ZipFile(foreign / "pytorch_model.bin", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="a zip file without data.pkl"):
        list(iter_checkpoint(foreign))


def test_corrupt_pickle_inside_a_valid_archive(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    source = zipfile.ZipFile(tmp_path / "pytorch_model.bin")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    with source, zipfile.ZipFile(damaged / "pytorch_model.bin", "w") as archive:
        for info in source.infolist():
            data = source.read(info)
            archive.writestr(info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin (is corrupt|could not be read).*[Rr]e-download"):
        list(iter_checkpoint(damaged))


def test_pickle_with_non_string_keys(tmp_path):
    torch.save({3: torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="has a key 3, not a tensor name"):
        list(iter_checkpoint(tmp_path))


# --- the torch floor for pickles ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["2.5.1+cu121", "2.4.0", "1.13.1", "unknown"])
def test_bin_needs_torch_2_6(tmp_path, monkeypatch, version):
    folder = bin_folder(tmp_path)
    monkeypatch.setattr(torch, "__version__", version)
    for attempt in (lambda: load_model(folder, device="cpu"), lambda: list(iter_checkpoint(folder))):
        with pytest.raises(CheckpointError, match=r"older than 2\.6.*CVE-2025-32434.*Upgrade torch to 2\.6 or "
                                                  r"newer, or use a safetensors copy"):
            attempt()


@pytest.mark.parametrize("version", ["2.6.0+cu124", "2.10.0", "3.0.0a0"])
def test_bin_loads_on_torch_2_6_and_newer(tmp_path, monkeypatch, version):
    folder = bin_folder(tmp_path)
    monkeypatch.setattr(torch, "__version__", version)
    assert load_model(folder, device="cpu").variant == "janus-pro"


def test_safetensors_load_on_any_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.1.0")
    assert load_model(PRO_TINY, device="cpu").variant == "janus-pro"


def test_requirements_never_install_torch():
    repo = Path(__file__).resolve().parents[1]
    lines = [line.split("#")[0].strip().lower() for line in (repo / "requirements.txt").read_text().splitlines()]
    names = [line.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for line in lines if line]
    assert names and not any(name in ("torch", "torchvision", "torchaudio") for name in names)


# --- safetensors headers ----------------------------------------------------------------------------------------

def test_deeply_nested_header(tmp_path):
    blob = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(CheckpointError, match="corrupt header .*nested too deeply.*re-download"):
        list(iter_checkpoint(tmp_path))


def test_non_utf8_header_names_the_file(tmp_path):
    blob = b'{"\xe9": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0")
    with pytest.raises(CheckpointError, match=r"model.safetensors has a corrupt header"):
        list(iter_checkpoint(tmp_path))


def test_header_beyond_the_format_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "MAX_HEADER_BYTES", 16)
    write_raw(tmp_path, {"w": {"dtype": "U8", "shape": [100], "data_offsets": [0, 100]}}, bytes(100))
    with pytest.raises(CheckpointError, match="beyond the format's limit"):
        stored_size(tmp_path)


# --- config.json against the bytes on disk, before anything is built --------------------------------------------

def test_stored_size_counts_values():
    assert stored_size(PRO_TINY) == ckpt.StoredSize(sum(t.numel() for t in stored().values()), 0)
    unused = sum(t.numel() for k, t in stored().items() if is_unused_key(k))
    assert unused > 65536  # codebook_used and the SigLIP attention pool
    assert stored_size(PRO_TINY, skip=is_unused_key).elements == sum(t.numel() for t in stored().values()) - unused


def test_stored_size_of_pickles_is_their_tensor_bytes(tmp_path):
    tensors = stored()
    a, b = split(tensors)
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: v.float() for k, v in b.items()}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in a} | {k: "pytorch_model-00002-of-00002.bin"
                                                                       for k in b}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    want = sum(t.numel() * 2 for t in a.values()) + sum(t.numel() * 4 for t in b.values())
    assert stored_size(tmp_path) == ckpt.StoredSize(0, want)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_config_far_larger_than_the_weights_is_refused_before_building(tmp_path, monkeypatch, layout):
    folder = full_copy(tmp_path / "m")
    if layout == "bin":
        torch.save(stored(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    edit_json(folder / "config.json", lambda c: c["language_config"].update(num_hidden_layers=500))

    def never(*args, **kwargs):
        raise AssertionError("the network was built")

    monkeypatch.setattr(model_module, "JanusARNet", never)
    no_weights_allocated(monkeypatch)
    with pytest.raises(CheckpointError, match=r"config.json describes a model of at least [\d,]+ weights but the "
                                              r"weight files in .* hold [\d,]+.*Re-download the checkpoint"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize(("edit", "more"), [
    (lambda c: c["gen_vision_config"]["params"].update(ch=64), True),  # the VQ model grows, the LLM does not
    (lambda c: (c["gen_vision_config"]["params"].update(codebook_size=1024),
                c["gen_head_config"]["params"].update(image_token_size=1024)), False),
])
def test_config_and_weights_of_different_sizes(tmp_path, monkeypatch, edit, more):
    folder = full_copy(tmp_path / "m")
    edit_json(folder / "config.json", edit)
    no_weights_allocated(monkeypatch)
    with pytest.raises(CheckpointError, match=r"describes a model of [\d,]+ weights but the weight files") as info:
        load_model(folder, device="cpu")
    found = re.search(r"(\d[\d,]*) weights but .* hold (\d[\d,]*)", str(info.value))
    expected, held = (int(n.replace(",", "")) for n in found.groups())
    assert (expected > held) == more and held == stored_size(PRO_TINY, skip=is_unused_key).elements


def test_small_mismatches_are_named_per_tensor(tmp_path):
    """Within the tolerance the loader still names exactly what differs."""
    folder = full_copy(tmp_path / "m")
    edit_json(folder / "config.json", lambda c: c["language_config"].update(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): language_model.model.layers.2"):
        load_model(folder, device="cpu")


def test_fp32_and_mixed_bin_files_fit_the_size_bounds(tmp_path):
    """.bin dtypes are unknown before unpickling: bf16/fp16 up to fp32 files (and mixes) all pass."""
    folder = side_files(tmp_path / "m")
    tensors = stored()
    torch.save({k: (v.float() if k.startswith("gen_vision_model") else v.half()) for k, v in tensors.items()},
               folder / "pytorch_model.bin")
    assert load_model(folder, device="cpu").variant == "janus-pro"
    torch.save({k: v.float() for k, v in tensors.items()}, folder / "pytorch_model.bin")
    assert load_model(folder, device="cpu").variant == "janus-pro"


def test_flow_config_mismatch(tmp_path, monkeypatch):
    folder = full_copy(tmp_path / "f", FLOW_TINY)
    edit_json(folder / "config.json", lambda c: c["vision_gen_enc_config"]["params"].update(
        block_out_channels=[256]))
    edit_json(folder / "config.json", lambda c: c["vision_gen_dec_config"]["params"].update(in_channels=256))
    no_weights_allocated(monkeypatch)
    with pytest.raises(CheckpointError, match="describes a model of [\\d,]+ weights"):
        load_model(folder, device="cpu")


def test_config_that_cannot_be_built(tmp_path):
    folder = full_copy(tmp_path / "m")
    edit_json(folder / "config.json", lambda c: c["gen_vision_config"]["params"].update(ch=48))
    with pytest.raises(CheckpointError, match=r"describes a network that cannot be built \(.*divisible"):
        load_model(folder, device="cpu")


# --- tokenizer and preprocessor side files ----------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"model": 3}', b"{" * 100_000])
def test_malformed_tokenizer_json(tmp_path, content):
    folder = full_copy(tmp_path / "m")
    (folder / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"tokenizer.json is not a valid tokenizer .*re-download"):
        load_model(folder, device="cpu")


def test_tokenizer_json_unreadable_by_an_old_tokenizers_library(tmp_path, monkeypatch):
    """tokenizers < 0.20 cannot parse the BPE merges current files store as pairs (the fixtures do): the error
    names the library and the upgrade instead of a broken download."""
    import tokenizers

    folder = full_copy(tmp_path / "m")
    (folder / "tokenizer.json").write_bytes(b'{"model": 3}')  # what the old library reports as unparseable
    monkeypatch.setattr(tokenizers, "__version__", "0.19.1")
    upgrade = r"tokenizers library \(0.19.1\) is too old .*pip install -U \"tokenizers>=0.20\""
    with pytest.raises(JanusError, match=upgrade) as info:
        load_model(folder, device="cpu")
    assert not isinstance(info.value, CheckpointError)
    assert json.loads((PRO_TINY / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"][0] == ["Ġ", "a"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("image_size", "384", "'?image_size'? must be an integer"),
    ("image_size", 0, "image_size = 0 is outside"),
    ("image_size", 512, "resizes images to 512 pixels but the vision tower of config.json takes 384"),
    ("min_size", 1000, "min_size = 1000 is outside"),
    ("image_mean", [0.5, 0.5], "image_mean must be a list of 3 numbers"),
    ("image_mean", [0.5, 2, 0.5], r"image_mean\[1\] = 2 is outside"),
    ("image_std", [0.5, 0, 0.5], r"image_std\[1\] = 0 is outside"),
    ("rescale_factor", -1, "rescale_factor = -1 is outside"),
    ("do_normalize", "yes", "do_normalize must be true or false"),
])
def test_malformed_preprocessor_config(tmp_path, key, value, message):
    folder = full_copy(tmp_path / "m")
    edit_json(folder / "preprocessor_config.json", lambda c: c.update({key: value}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(folder, device="cpu")
    assert "preprocessor_config.json" in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    (b"\x80abc", "is not UTF-8"), (b"{x", "is not valid JSON"), (b"[1]", "holds a list where an object"),
])
def test_unreadable_preprocessor_config(tmp_path, content, message):
    folder = full_copy(tmp_path / "m")
    (folder / "preprocessor_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"preprocessor_config.json {message}"):
        load_model(folder, device="cpu")


# --- files the system will not read, mixed downloads, integers where weights belong ---------------------------

def deny_reading(monkeypatch, victim: Path) -> None:
    """Make opening ``victim`` fail as a file without read permission does (tests may run as root, where
    chmod 000 does not stop a read)."""
    real_open = Path.open

    def guarded(self, *args, **kwargs):
        if self == victim:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)
    monkeypatch.setattr(Path, "open", guarded)


@pytest.mark.parametrize("file", ["model.safetensors", "preprocessor_config.json", "config.json"])
def test_unreadable_files_are_named_with_what_to_do(tmp_path, monkeypatch, file):
    folder = full_copy(tmp_path / "m")
    deny_reading(monkeypatch, folder / file)
    with pytest.raises(CheckpointError) as info:
        load_model(folder, device="cpu")
    assert str(info.value).startswith(f"{folder / file}: Permission denied. Give the user running ComfyUI")


def test_unreadable_weight_file_on_the_command_line(tmp_path, monkeypatch, caplog):
    from janus_core import cli

    folder = full_copy(tmp_path / "m")
    deny_reading(monkeypatch, folder / "model.safetensors")
    argv = ["generate", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2  # a user mistake: one ERROR line, no traceback
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "model.safetensors: Permission denied" in errors[0]


def retype(path: Path, name: str, dtype: str) -> None:
    """Rewrite the safetensors header of ``path`` so that tensor ``name`` claims ``dtype`` (same byte size)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header[name]["dtype"] = dtype
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (length - len(blob))
    assert len(blob) == length
    path.write_bytes(raw[:8] + blob + raw[8 + length:])


def test_integer_data_for_a_float_weight_is_refused(tmp_path):
    folder = full_copy(tmp_path / "m")
    name = next(n for n, t in stored().items() if t.dtype in (torch.bfloat16, torch.float16))
    retype(folder / "model.safetensors", name, "I16")
    with pytest.raises(CheckpointError, match=f"tensor '{re.escape(name)}' is stored as int16, but it is a "
                                              r"floating-point \(.*\) weight.*Re-download"):
        load_model(folder, device="cpu")


def test_integer_data_for_a_float_weight_in_a_bin_is_refused(tmp_path):
    folder = full_copy(tmp_path / "m")
    tensors = stored()
    name = "aligner.layers.0.weight"
    tensors[name] = tensors[name].view(torch.int16) if tensors[name].element_size() == 2 else tensors[name].int()
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    for quantize in (None, "int8"):
        with pytest.raises(CheckpointError, match=f"{name}: checkpoint torch.int.* vs model torch.float"):
            load_model(folder, device="cpu", quantize=quantize)


def test_a_tensor_stored_in_two_shards_is_refused(sharded):
    from safetensors.torch import load_file, save_file

    first = load_file(str(sharded / SHARD_1))
    name = sorted(first)[0]
    second = load_file(str(sharded / SHARD_2))
    save_file({**second, name: torch.zeros_like(first[name])}, str(sharded / SHARD_2))
    expected = f"'{re.escape(name)}' is stored twice, in {SHARD_1} and in {SHARD_2}.*Re-download"
    with pytest.raises(CheckpointError, match=expected):
        load_model(sharded, device="cpu")
    from janus_core.quant.folder import save_quantized

    with pytest.raises(CheckpointError, match=expected):
        save_quantized(sharded, sharded.parent / "q", "int8")


def test_a_tensor_stored_in_two_bin_shards_is_refused(tmp_path):
    from tests.test_checkpoint import make_sharded_bin

    folder = side_files(tmp_path / "m")
    make_sharded_bin(folder)
    shards = sorted(folder.glob("*.bin"))
    a, b = (torch.load(p, weights_only=True) for p in shards)
    name = sorted(a)[0]
    torch.save({**b, name: torch.zeros_like(a[name])}, shards[1])
    with pytest.raises(CheckpointError, match=f"'{re.escape(name)}' is stored twice"):
        load_model(folder, device="cpu")


def test_an_index_that_misplaces_a_tensor_is_refused(sharded):
    index = json.loads((sharded / INDEX).read_text())
    name = next(k for k, v in index["weight_map"].items() if v == SHARD_1)
    index["weight_map"][name] = SHARD_2
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"places 1 tensor.s. in {SHARD_2} that it does not hold "
                                              f"\\({re.escape(name)}\\).*different downloads"):
        load_model(sharded, device="cpu")


def test_preprocessor_config_that_is_a_folder_is_refused(tmp_path):
    folder = full_copy(tmp_path / "m")
    (folder / "preprocessor_config.json").unlink()
    (folder / "preprocessor_config.json").mkdir()
    with pytest.raises(CheckpointError, match="preprocessor_config.json: Is a directory"):
        load_model(folder, device="cpu")
