"""Config parsing for every variant: LlamaConfig defaults, flash-attn entries, variant detection, sizes."""

import json
import shutil

import pytest
import torch

from janus_core.config import load_config, parse_config
from janus_core.errors import CheckpointError, JanusError
from janus_core.modules.composite import JanusARNet, JanusFlowNet
from tests.conftest import FIXTURES, FLOW_TINY, PRO_TINY

CONFIGS = FIXTURES / "configs"
ATTN_POOL_PARAMS = 12_595_200  # stored in every checkpoint, never run, not built


def real_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))


def meta_net(cfg):
    with torch.device("meta"):
        return JanusFlowNet(cfg) if cfg.is_flow else JanusARNet(cfg)


def test_pro_7b_takes_llama_defaults():
    cfg = parse_config(real_config("janus-pro-7b"), variant="janus-pro")
    llm = cfg.llm
    assert (llm.hidden_size, llm.intermediate_size, llm.num_attention_heads, llm.num_key_value_heads) == (
        4096, 11008, 32, 32)
    assert (llm.num_hidden_layers, llm.vocab_size, llm.rms_norm_eps, llm.rope_theta) == (30, 102400, 1e-6, 10000.0)
    assert cfg.siglip.layers == 24 and cfg.siglip.width == 1024
    assert cfg.vq.codebook_size == 16384 and cfg.vq.ch_mult == (1, 1, 2, 2, 4)


@pytest.mark.parametrize(
    ("name", "variant", "published_params"),
    [
        # totals enumerated in the spec from the published checkpoint sizes (attn_pool included)
        ("janus-pro-7b", "janus-pro", 7_420_368_523),
        ("janus-1.3b", "janus-1.3b", 2_089_232_011),
        ("janusflow-1.3b", None, 2_046_367_504),
    ],
)
def test_real_sizes_match_published_checkpoints(name, variant, published_params):
    cfg = parse_config(real_config(name), variant=variant)
    net = meta_net(cfg)
    assert sum(p.numel() for p in net.parameters()) == published_params - ATTN_POOL_PARAMS
    # the count the loader checks before building anything
    assert cfg.llm.parameter_count == sum(t.numel() for t in net.language_model.state_dict().values())


@pytest.mark.parametrize("folder", [PRO_TINY, FLOW_TINY])
def test_language_model_count_of_the_fixtures(folder):
    cfg = load_config(folder)
    assert cfg.llm.parameter_count == sum(t.numel() for t in meta_net(cfg).language_model.state_dict().values())


def test_flash_attention_entry_is_harmless(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(PRO_TINY, folder, ignore=shutil.ignore_patterns("golden"))
    raw = json.loads((folder / "config.json").read_text())
    raw["language_config"]["_attn_implementation"] = "flash_attention_2"
    (folder / "config.json").write_text(json.dumps(raw))
    from janus_core import load_model

    model = load_model(folder, device="cpu", dtype=torch.float32)
    assert model.variant == "janus-pro"


def test_variant_detection():
    assert load_config(PRO_TINY).variant == "janus-pro"
    assert load_config(FLOW_TINY).variant == "janusflow"
    assert load_config(PRO_TINY, variant="janus-1.3b").variant == "janus-1.3b"
    assert parse_config(real_config("janus-1.3b"), variant="janus-1.3b").variant == "janus-1.3b"
    with pytest.raises(CheckpointError, match="A config.json alone cannot tell Janus-Pro from Janus-1.3B"):
        parse_config(real_config("janus-1.3b"))


def test_janus_4o_7b_is_janus_pro_7b():
    """Janus-4o-7B ships Janus-Pro-7B's config and the Pro tokenizer files: detected as Janus-Pro, same network."""
    from janus_core.hub import KNOWN_RELEASES, ModelKind

    cfg = load_config(CONFIGS / "janus-4o-7b")
    assert cfg.variant == "janus-pro" and ModelKind.of(cfg) is KNOWN_RELEASES["Janus-4o-7B"].kind is ModelKind.AR
    assert cfg == parse_config(real_config("janus-pro-7b"), variant="janus-pro")
    assert cfg.image_token_grid == (24, 24) and cfg.num_image_tokens == 576


def folder_copy(tmp_path, source=PRO_TINY):
    folder = tmp_path / "m"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("golden", "vae", "*.safetensors"))
    return folder


def test_janus_1_3b_special_tokens_map(tmp_path):
    """The Janus-1.3B release's special_tokens_map.json lists no additional special tokens: 1.3B roles."""
    folder = folder_copy(tmp_path)
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "pad_token": "<｜▁pad▁｜>"}))
    assert load_config(folder).variant == "janus-1.3b"


def test_pro_without_special_tokens_map_is_not_guessed(tmp_path):
    folder = folder_copy(tmp_path)
    (folder / "special_tokens_map.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no special_tokens_map.json, and its tokenizer.json declares "
                                              r"<\|User\|>.*--variant janus-pro.*variant='janus-pro' / 'janus-1.3b'"):
        load_config(folder)
    assert load_config(folder, variant="janus-pro").variant == "janus-pro"
    assert load_config(folder, variant="janus-1.3b").variant == "janus-1.3b"
    from janus_core import load_model

    with pytest.raises(CheckpointError, match="Janus Model Loader node"):
        load_model(folder, device="cpu")


def test_tokenizer_without_the_pro_role_token_is_janus_1_3b(tmp_path):
    folder = folder_copy(tmp_path)
    (folder / "special_tokens_map.json").unlink()
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in ("<|User|>", "<|Assistant|>")]
    (folder / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    assert load_config(folder).variant == "janus-1.3b"


def test_flow_needs_no_tokenizer_files_for_detection(tmp_path):
    folder = folder_copy(tmp_path, FLOW_TINY)
    (folder / "special_tokens_map.json").unlink()
    (folder / "tokenizer.json").unlink()
    assert load_config(folder).variant == "janusflow"


def test_no_tokenizer_files_at_all(tmp_path):
    folder = folder_copy(tmp_path)
    (folder / "special_tokens_map.json").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has neither special_tokens_map.json nor tokenizer.json"):
        load_config(folder)


@pytest.mark.parametrize(("file", "content", "message"), [
    ("special_tokens_map.json", b"{x", "special_tokens_map.json is not valid JSON"),
    ("special_tokens_map.json", b"\xff\xfe", "special_tokens_map.json is not UTF-8"),
    ("special_tokens_map.json", b"[]", "special_tokens_map.json holds a list"),
    ("special_tokens_map.json", b'{"additional_special_tokens": "<|User|>"}',
     "additional_special_tokens must be a list, found a string"),
    ("special_tokens_map.json", b'{"additional_special_tokens": [5]}',
     "additional_special_tokens holds 5, which is neither a string nor a token"),
    ("special_tokens_map.json", b'{"additional_special_tokens": [{"content": null}]}', "neither a string nor"),
    ("tokenizer.json", b'{"added_tokens": {}}', "tokenizer.json: added_tokens must be a list, found an object"),
    ("tokenizer.json", b"\x80", "tokenizer.json is not UTF-8"),
])
def test_malformed_tokenizer_side_files(tmp_path, file, content, message):
    folder = folder_copy(tmp_path)
    if file == "tokenizer.json":
        (folder / "special_tokens_map.json").unlink()
    (folder / file).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_config(folder)


def test_tiny_size_fields_are_honoured():
    cfg = load_config(PRO_TINY)
    assert cfg.vq.ch == 32 and cfg.vq.ch_mult == (1, 1, 1, 1, 2) and cfg.vq.codebook_size == 4096
    assert cfg.siglip.width == 32 and cfg.siglip.layers == 2
    assert cfg.llm.num_key_value_heads == 2
    flow = load_config(FLOW_TINY)
    assert flow.flow.enc_channels == 32 and flow.llm.hidden_size == 64


def test_bad_configs(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_config(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="model_type 'llava'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(JanusError, match="Unknown variant"):
        load_config(PRO_TINY, variant="janus-2")
    with pytest.raises(JanusError, match="architectures differ"):
        load_config(PRO_TINY, variant="janusflow")
    raw = real_config("janus-1.3b")
    raw["vision_config"]["params"]["model_name"] = "siglip_huge"
    with pytest.raises(CheckpointError, match="unknown vision tower 'siglip_huge'"):
        parse_config(raw, variant="janus-1.3b")


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe{}", r"config.json is not UTF-8"),
    (b"[1, 2]", r"config.json holds a list, not a JSON object"),
    (b'"text"', r"config.json holds a string, not a JSON object"),
    (b"[" * 100_000, r"config.json (is nested too deeply|is not valid JSON)"),
    (b"", r"config.json is not valid JSON"),
])
def test_unreadable_config_files(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_config(tmp_path)


def set_path(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        cfg = cfg[key]
    cfg[last] = value


LANG = "language_config"
VISION = "vision_config.params.siglip_cfg_override"


@pytest.mark.parametrize(("dotted", "value", "message"), [
    ("language_config", [1], "'language_config' must be a JSON object, found a list"),
    ("vision_config", "siglip", "'vision_config' must be a JSON object, found a string"),
    ("vision_config.params", 3, "'vision_config.params' must be a JSON object, found a number"),
    (VISION, [], "'vision_config.params.siglip_cfg_override' must be a JSON object"),
    (f"{LANG}.hidden_size", 0, "language_config.hidden_size = 0 is outside the plausible range 1..65536"),
    (f"{LANG}.hidden_size", -64, "hidden_size = -64 is outside"),
    (f"{LANG}.hidden_size", 64.0, "hidden_size must be an integer, found 64.0"),
    (f"{LANG}.hidden_size", True, "hidden_size must be an integer, found True"),
    (f"{LANG}.hidden_size", "64", "hidden_size must be an integer, found '64'"),
    (f"{LANG}.hidden_size", 10**9, "hidden_size = 1000000000 is outside the plausible range"),
    (f"{LANG}.num_hidden_layers", 10**6, "num_hidden_layers = 1000000 is outside the plausible range 1..512"),
    (f"{LANG}.num_hidden_layers", 0, "num_hidden_layers = 0 is outside"),
    (f"{LANG}.vocab_size", 10**9, "vocab_size = 1000000000 is outside"),
    (f"{LANG}.intermediate_size", 10**7, "intermediate_size = 10000000 is outside"),
    (f"{LANG}.num_attention_heads", 0, "num_attention_heads = 0 is outside"),
    (f"{LANG}.num_attention_heads", 3, "num_attention_heads = 3 does not divide hidden_size 64"),
    (f"{LANG}.num_attention_heads", 64, "into heads of an even size"),
    (f"{LANG}.num_key_value_heads", 3, "num_key_value_heads = 3 does not divide num_attention_heads 4"),
    (f"{LANG}.num_key_value_heads", 8, "num_key_value_heads = 8 is outside the plausible range 1..4"),
    (f"{LANG}.rms_norm_eps", 0, r"rms_norm_eps = 0 is outside the plausible range \(0.0, 1.0\]"),
    (f"{LANG}.rms_norm_eps", float("nan"), "rms_norm_eps must be a number, found nan"),
    (f"{LANG}.rope_theta", -1, "rope_theta = -1 is outside"),
    (f"{LANG}.hidden_act", "gelu", "hidden_act is 'gelu'; Janus language models use 'silu'"),
    (f"{LANG}.tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
    (f"{LANG}.max_position_embeddings", 0, "max_position_embeddings = 0 is outside"),
    # too few positions for the 576 image tokens and a prompt: refused at load, not mid-generation
    (f"{LANG}.max_position_embeddings", 600, r"max_position_embeddings = 600 is outside the plausible range 1024\.\."),
    # LlamaConfig options no release sets: building without them would compute another network
    (f"{LANG}.tie_word_embeddings", True, "tie_word_embeddings is true, which no Janus release uses"),
    (f"{LANG}.attention_bias", True, "attention_bias is true, which no Janus release uses"),
    (f"{LANG}.mlp_bias", True, "mlp_bias is true"),
    (f"{LANG}.rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling is set"),
    (f"{LANG}.head_dim", 8, r"head_dim differs from hidden_size / num_attention_heads \(16\)"),
    ("gen_vision_config.params.ch_mult", [], r"ch_mult must be a list of 1 to 8 integers, found \[\]"),
    ("gen_vision_config.params.ch_mult", "11224", "ch_mult must be a list"),
    ("gen_vision_config.params.ch_mult", [1, 0], r"ch_mult\[1\] = 0 is outside"),
    ("gen_vision_config.params.ch", 0, "gen_vision_config.params.ch = 0 is outside"),
    ("gen_vision_config.params.codebook_size", 0, "codebook_size = 0 is outside"),
    ("aligner_config.params.n_embed", 32, "aligner_config.params.n_embed = 32 does not match language_config"),
    ("aligner_config.params.input_dim", 64, "input_dim = 64 does not match the vision tower's width"),
    ("aligner_config.params.depth", 0, "aligner_config.params.depth = 0 is outside"),
    ("aligner_config.params.projector_type", "linear", "projector_type is 'linear'; only 'mlp_gelu'"),
    ("gen_aligner_config.params.input_dim", 16, "does not match gen_vision_config's codebook_embed_dim"),
    ("gen_head_config.params.image_token_size", 16384, "does not match gen_vision_config's codebook_size"),
    ("gen_head_config.params.n_embed", None, "gen_head_config.params.n_embed is missing"),
    ("gen_head_config", None, "has no 'gen_head_config' section"),
    (f"{VISION}.layers", 0, "siglip_cfg_override.layers = 0 is outside"),
    (f"{VISION}.heads", 3, "siglip_cfg_override.heads = 3 does not divide the width 32"),
    (f"{VISION}.patch_size", 0, "patch_size = 0 is outside"),
    (f"{VISION}.mlp_ratio", 0, "mlp_ratio = 0 is outside"),
    ("vision_config.params.image_size", 383, "image_size = 383 is not a multiple of the patch size 16"),
    ("vision_config.params.select_layer", -5, "select_layer = -5 is outside the plausible range -2.."),
])
def test_implausible_or_inconsistent_configs(tmp_path, dotted, value, message):
    folder = folder_copy(tmp_path)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    set_path(raw, dotted, value)
    (folder / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(CheckpointError, match=message) as info:
        load_config(folder)
    assert str(folder / "config.json") in str(info.value) and "re-download the checkpoint" in str(info.value)


@pytest.mark.parametrize(("dotted", "value", "message"), [
    ("vision_gen_enc_config.params.block_out_channels", [], "block_out_channels must be a list of 1 to 8"),
    ("vision_gen_enc_config.params.block_out_channels", [32, -1], r"block_out_channels\[1\] = -1 is outside"),
    ("vision_gen_dec_config.params.upsamples", 0, "upsamples = 0 is outside the plausible range 1..8"),
    ("vision_gen_enc_config.params.kernel_size", 0, "kernel_size = 0 is outside"),
    # patchify settings that do not give the 24 x 24 grid the prompt reserves: refused at load
    ("vision_gen_enc_config.params.stride", 1, "turns the 48x48 latent into 47x47 tokens, not the 24x24"),
    ("vision_gen_enc_config.params.padding", 1, "with stride 2 and padding 1 turns the 48x48 latent into 25x25"),
    ("vision_gen_dec_config.params.upsamples", 2, "upsamples = 2 does not turn the 24x24 tokens back"),
    ("vision_gen_enc_config.params.norm_eps", -1e-6, "norm_eps = -1e-06 is outside"),
    ("vision_gen_dec_config.params", [1], "'vision_gen_dec_config.params' must be a JSON object"),
    ("vision_und_enc_config.params.siglip_cfg_override.width", 10**6, "width = 1000000 is outside"),
])
def test_implausible_flow_configs(tmp_path, dotted, value, message):
    folder = folder_copy(tmp_path, FLOW_TINY)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    set_path(raw, dotted, value)
    (folder / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(CheckpointError, match=message):
        load_config(folder)


def test_public_api_is_exported_lazily():
    import subprocess
    import sys

    code = ("import sys, janus_core; assert 'torch' not in sys.modules; "
            "names = ['load_model', 'generate_image_tokens', 'decode_image_tokens', 'generate_flow_latents', "
            "'understand', 'JanusModel', 'JanusError']; assert all(callable(getattr(janus_core, n)) for n in names)")
    subprocess.run([sys.executable, "-c", code], check=True)
