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


def meta_params(cfg) -> int:
    with torch.device("meta"):
        net = JanusFlowNet(cfg) if cfg.is_flow else JanusARNet(cfg)
    return sum(p.numel() for p in net.parameters())


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
    assert meta_params(cfg) == published_params - ATTN_POOL_PARAMS


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
    assert parse_config(real_config("janus-1.3b")).variant == "janus-1.3b"  # no special_tokens_map: 1.3B roles
    assert load_config(PRO_TINY, variant="janus-1.3b").variant == "janus-1.3b"


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
    with pytest.raises(CheckpointError, match="Unknown vision tower"):
        parse_config(raw)


def test_public_api_is_exported_lazily():
    import subprocess
    import sys

    code = ("import sys, janus_core; assert 'torch' not in sys.modules; "
            "names = ['load_model', 'generate_image_tokens', 'decode_image_tokens', 'generate_flow_latents', "
            "'understand', 'JanusModel', 'JanusError']; assert all(callable(getattr(janus_core, n)) for n in names)")
    subprocess.run([sys.executable, "-c", code], check=True)
