"""Runs that do not fit in memory are refused before they allocate: the free-memory sources (meminfo, cgroups),
the check and its margin, where the library checks, and each run's estimate against what it really allocates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from janus_core import load_model, memory
from janus_core.errors import JanusError
from janus_core.generate_ar import (
    build_cfg_pair,
    decode_bytes,
    decode_image_tokens,
    generate_image_tokens,
    generation_bytes,
    score_image_tokens,
    scoring_bytes,
)
from janus_core.generate_flow import (
    build_flow_cfg,
    flow_bytes,
    generate_flow_latents,
    initial_noise,
    iter_flow_steps,
    noise_bytes,
)
from janus_core.image_tokens import encode_bytes, encode_image_tokens
from janus_core.llm import KVCache, kv_cache_bytes
from janus_core.modules.siglip import SigLIPViT, vit_activation_bytes
from janus_core.modules.uvit import ShallowUViTDecoder, ShallowUViTEncoder, convnext_activation_bytes
from janus_core.modules.vq import Decoder, VQModel, decoder_activation_bytes, encoder_activation_bytes
from janus_core.understanding import understand, understanding_bytes
from tests.conftest import FLOW_TINY, IMAGE_PATH, PRO_TINY

GIB = 2**30
RELEASE_GRID = (24, 24)  # VQ tokens of a released model's image
REFUSAL = r"batch {n} needs \d+\.\d\d GB, \d+\.\d\d GB free on cpu; lower batch_size\."


class Stop(Exception):
    """Raised from a callback: the run got past the memory check and started."""


def stop(*_args) -> None:
    raise Stop


@pytest.fixture(scope="module")
def pro():
    return load_model(PRO_TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def flow():
    return load_model(FLOW_TINY, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(IMAGE_PATH).convert("RGB")


@pytest.fixture
def free(monkeypatch):
    """Fake the free memory of every device: ``free(n)`` sets it to ``n`` bytes (None: unknown)."""
    def set_free(n: int | None) -> None:
        monkeypatch.setattr(memory, "free_bytes", lambda device: n)
    return set_free


def peak_allocated(fn, *args, **kwargs) -> tuple[object, int]:
    """``fn``'s result and the peak bytes it allocated beyond what existed before (the profiler's allocator
    events: every tensor, kernel work buffers included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss_growth(fn) -> int:
    """How far the resident memory rose above its level before ``fn`` (Linux: the high-water mark is reset)."""
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def assert_covers(estimate: int, measured: int) -> None:
    """The estimate neither lets a run run out of memory nor refuses it needlessly."""
    assert measured <= estimate < 2 * measured, (estimate, measured)


# --- free memory ------------------------------------------------------------------------------------------

MEMINFO = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nBuffers: 10 kB\n"


def test_meminfo_available():
    assert memory.meminfo_available(MEMINFO) == 20000000 * 1024
    old_kernel = "MemTotal: 8000 kB\nMemFree: 1000 kB\nBuffers: 200 kB\nCached: 300 kB\n"
    assert memory.meminfo_available(old_kernel) == 1500 * 1024
    assert memory.meminfo_available("garbage\n") is None


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


def test_cgroup_v2_tightest_level_counts(tmp_path):
    root = tmp_path / "cgroup"
    leaf = root / "user.slice" / "app.scope"
    write(leaf / "memory.max", "max\n")  # no limit of its own
    write(leaf / "memory.current", "100\n")
    write(root / "user.slice" / "memory.max", str(8 * GIB))
    write(root / "user.slice" / "memory.current", str(6 * GIB))
    write(root / "user.slice" / "memory.stat", f"anon {5 * GIB}\ninactive_file {GIB}\nactive_file 7\n")
    proc = "0::/user.slice/app.scope\n"
    assert memory.cgroup_available(proc, root) == 3 * GIB  # 8 - (6 - 1 droppable)
    write(root / "memory.max", str(7 * GIB))
    write(root / "memory.current", str(6 * GIB))
    assert memory.cgroup_available(proc, root) == GIB  # the root's limit is tighter
    write(tmp_path / "meminfo", MEMINFO)
    write(tmp_path / "cgroup.txt", proc)
    assert memory.cpu_free_bytes(tmp_path / "meminfo", tmp_path / "cgroup.txt", root) == GIB
    write(root / "memory.max", "max\n")
    write(root / "user.slice" / "memory.max", str(64 * GIB))  # the host's available memory is less
    assert memory.cpu_free_bytes(tmp_path / "meminfo", tmp_path / "cgroup.txt", root) == 20000000 * 1024


def test_cgroup_v1_and_namespaces(tmp_path):
    root = tmp_path / "cgroup"
    folder = root / "memory" / "docker" / "abc"
    write(folder / "memory.limit_in_bytes", str(2 * GIB))
    write(folder / "memory.usage_in_bytes", str(GIB + GIB // 2))
    write(folder / "memory.stat", f"cache 9\ninactive_file 1\ntotal_inactive_file {GIB // 4}\n")
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    write(root / "memory" / "memory.usage_in_bytes", str(40 * GIB))
    proc = "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n"
    assert memory.cgroup_available(proc, root) == GIB // 2 + GIB // 4
    # in a cgroup namespace the listed path is not visible: the mount's own files describe this container
    write(root / "memory" / "memory.limit_in_bytes", str(4 * GIB))
    write(root / "memory" / "memory.usage_in_bytes", str(3 * GIB))
    assert memory.cgroup_available("4:memory:/host/path/not/here\n", root) == GIB
    assert memory.cgroup_available("1:cpu:/x\n", root) is None  # no memory controller: no limit known


def test_free_bytes_of_this_machine():
    # MemAvailable moves while other processes run: compare with the larger of a reading before and after
    before = memory.meminfo_available(Path("/proc/meminfo").read_text())
    free = memory.free_bytes("cpu")
    after = memory.meminfo_available(Path("/proc/meminfo").read_text())
    assert free is not None and 0 < free <= max(before, after)
    assert memory.free_bytes(torch.device("meta")) is None


# --- the check --------------------------------------------------------------------------------------------

def test_check_fits_threshold_and_message(free, monkeypatch):
    need = 3 * GIB
    required = memory.required_bytes(need)
    assert required == int(need * (1 + memory.MARGIN_FRACTION)) + memory.MARGIN_BYTES
    free(required)
    memory.check_fits("cpu", need, "Image generation", 4)
    free(required - 1)
    message = f"Image generation: batch 4 needs {required / 1e9:.2f} GB, {(required - 1) / 1e9:.2f} GB free on cpu; "
    with pytest.raises(JanusError, match=re.escape(message + "lower batch_size.")):
        memory.check_fits("cpu", need, "Image generation", 4)
    with pytest.raises(JanusError, match="batch 1 needs .* free memory"):  # nothing to lower
        memory.check_fits("cpu", need, "Image generation", 1)
    free(None)  # unknown: not checked
    memory.check_fits("cpu", 10**15, "Image generation", 4)
    free(0)
    monkeypatch.setenv(memory.CHECK_ENV, "0")
    memory.check_fits("cpu", 10**15, "Image generation", 4)


def test_largest_fitting(free):
    def bytes_for(n):
        return n * GIB

    free(memory.required_bytes(5 * GIB))
    assert memory.largest_fitting("cpu", 12, bytes_for, "decoding") == 5
    assert memory.largest_fitting("cpu", 3, bytes_for, "decoding") == 3
    free(None)
    assert memory.largest_fitting("cpu", 12, bytes_for, "decoding") == 12
    free(memory.required_bytes(GIB) - 1)
    with pytest.raises(JanusError, match="decoding: batch 1 needs"):
        memory.largest_fitting("cpu", 12, bytes_for, "decoding")


# --- the library refuses before allocating ----------------------------------------------------------------

@pytest.mark.parametrize("run", ["flow", "ar"])
def test_huge_batch_is_refused_before_allocating(run, pro, flow):
    def refused():
        with pytest.raises(JanusError, match=REFUSAL.format(n=10**6)):
            if run == "flow":
                generate_flow_latents(flow, "x", batch_size=10**6)
            else:
                generate_image_tokens(pro, "x", batch_size=10**6)

    assert peak_rss_growth(refused) < 64 * 2**20


def test_initial_noise_is_checked(flow, free):
    with pytest.raises(JanusError, match=REFUSAL.format(n=10**6)):
        initial_noise(flow, 10**6, 0)
    free(memory.required_bytes(noise_bytes(flow, 3)))
    assert initial_noise(flow, 3, 0).shape == (3, 4, 48, 48)
    free(memory.required_bytes(noise_bytes(flow, 3)) - 1)
    with pytest.raises(JanusError, match="JanusFlow starting noise: batch 3 needs"):
        initial_noise(flow, 3, 0)


@pytest.mark.parametrize(("edit", "what"), [(False, "Image generation"), (True, "Image editing")])
def test_generation_threshold(pro, image, free, edit, what):
    pair = build_cfg_pair(pro, "a red cube", 3, image=image if edit else None)
    required = memory.required_bytes(generation_bytes(pro, pair))
    free(required - 1)
    with pytest.raises(JanusError, match=f"{what}: batch 3 needs"):
        generate_image_tokens(pro, pair, callback=stop)
    free(required)
    with pytest.raises(Stop):
        generate_image_tokens(pro, pair, callback=stop)


@pytest.mark.parametrize("cfg_weight", [2.0, 1.0])
def test_flow_threshold(flow, free, cfg_weight):
    pair = build_flow_cfg(flow, "a lighthouse", 3)
    required = memory.required_bytes(flow_bytes(flow, pair, cfg_weight))
    noise = initial_noise(flow, 3, 0)
    free(required - 1)
    with pytest.raises(JanusError, match="JanusFlow generation: batch 3 needs"):
        next(iter_flow_steps(flow, pair, noise, 2, cfg_weight))
    free(required)
    assert next(iter_flow_steps(flow, pair, noise, 2, cfg_weight)).step == 0
    assert flow_bytes(flow, pair, 1.0) < flow_bytes(flow, pair, 2.0)  # unguided runs skip the uncond rows


def test_understanding_threshold(pro, image, free):
    required = memory.required_bytes(understanding_bytes(pro, 2, "What is this?", 16))
    free(required - 1)
    with pytest.raises(JanusError, match="Image understanding: batch 2 needs .* use fewer images"):
        understand(pro, [image, image], "What is this?", max_new_tokens=16, callback=stop)
    free(required)
    with pytest.raises(Stop):
        understand(pro, [image, image], "What is this?", max_new_tokens=16, callback=stop)


def test_decode_in_chunks_that_fit(pro, free, monkeypatch):
    tokens = torch.randint(0, pro.config.vq.codebook_size, (3, 576),
                           generator=torch.Generator().manual_seed(0))
    whole = decode_image_tokens(pro, tokens)  # free memory of this machine: all at once
    vq = pro.net.gen_vision_model
    sizes = []
    real_decode = vq.decode_code
    monkeypatch.setattr(vq, "decode_code", lambda codes, grid: sizes.append(len(codes)) or real_decode(codes, grid))
    free(memory.required_bytes(decode_bytes(pro, 2)))
    chunked = decode_image_tokens(pro, tokens)
    assert sizes == [2, 1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)  # conv kernels may round per batch size
    free(memory.required_bytes(decode_bytes(pro, 1)) - 1)
    with pytest.raises(JanusError, match="VQ decoding: batch 1 needs"):
        decode_image_tokens(pro, tokens)


# --- the estimates against what the runs allocate ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_estimate_is_the_cache(pro, dtype):
    cache = KVCache.allocate(pro.llm, 3, 50, with_mask=True)
    held = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values, cache.valid))
    assert kv_cache_bytes(pro.config.llm, 3, 50, pro.dtype) == held
    spec = pro.config.llm  # the estimate scales with the dtype as the cache does
    assert kv_cache_bytes(spec, 3, 50, dtype) - 3 * 50 == (held - 3 * 50) * dtype.itemsize // pro.dtype.itemsize


def test_generation_estimate(pro):
    pair = build_cfg_pair(pro, "a red cube on a blue table", 2, negative_prompt="blurry, dark")
    _, measured = peak_allocated(generate_image_tokens, pro, pair, seed=1, top_p=0.9)
    assert_covers(generation_bytes(pro, pair), measured)


def test_editing_estimate(pro, image):
    pair = build_cfg_pair(pro, "make the sky purple", 2, image=image)  # a prompt of ~1.2k positions, 3 rows
    _, measured = peak_allocated(generate_image_tokens, pro, pair, seed=1)
    assert_covers(generation_bytes(pro, pair), measured)


def test_inpainting_estimate_with_kept_rows_fed_at_once(pro):
    pair = build_cfg_pair(pro, "a red cube", 2)
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[12:] = True  # the first 288 tokens are fed as one block
    init = torch.randint(0, 4096, (2, 576), generator=torch.Generator().manual_seed(0))
    _, measured = peak_allocated(generate_image_tokens, pro, pair, seed=1, init_tokens=init, mask=mask)
    assert_covers(generation_bytes(pro, pair, 288), measured)


@pytest.mark.parametrize("edit", [False, True])
def test_scoring_estimate(pro, image, edit):
    pair = build_cfg_pair(pro, "a red cube", 2, image=image if edit else None)
    tokens = torch.randint(0, 4096, (2, 576), generator=torch.Generator().manual_seed(0))
    _, measured = peak_allocated(score_image_tokens, pro, pair, tokens)
    assert_covers(scoring_bytes(pro, pair, 2, 576), measured)


def test_encode_estimate(pro, image):
    _, measured = peak_allocated(encode_image_tokens, pro, [image, image])
    assert_covers(encode_bytes(pro, 2), measured)


@pytest.mark.parametrize(("dtype", "batch", "negative", "cfg_weight", "image_input"), [
    (torch.float32, 2, "fog", 2.0, False), (torch.float32, 2, None, 1.0, False), (torch.bfloat16, 1, None, 2.0, False),
    (torch.float32, 2, None, 1.0, True), (torch.bfloat16, 2, "fog", 2.0, True)])
def test_flow_estimate(flow, dtype, batch, negative, cfg_weight, image_input):
    model = flow if dtype == torch.float32 else load_model(FLOW_TINY, device="cpu", dtype=dtype)
    pair = build_flow_cfg(model, "a lighthouse at dusk", batch, negative)
    noise = initial_noise(model, batch, 0)
    # img2img inpainting: an input latent per image and a pixel-resolution mask
    image = dict(init_latent=torch.randn(batch, 4, 48, 48), denoise=0.5,
                 noise_mask=torch.ones(batch, 1, 384, 384)) if image_input else {}
    _, measured = peak_allocated(lambda: list(iter_flow_steps(model, pair, noise, 2, cfg_weight, **image)))
    assert_covers(flow_bytes(model, pair, cfg_weight, image_input), measured)


@pytest.mark.parametrize(("which", "per_image"), [("pro", True), ("flow", False)])
def test_understanding_estimate(which, per_image, pro, flow, image):
    model = pro if which == "pro" else flow
    _, measured = peak_allocated(understand, model, [image, image], "What is this?", max_new_tokens=8,
                                 temperature=0.7, per_image=per_image)
    assert_covers(understanding_bytes(model, 2, "What is this?", 8, per_image), measured)


def test_decode_estimate(pro):
    tokens = torch.randint(0, pro.config.vq.codebook_size, (2, 576))
    _, measured = peak_allocated(decode_image_tokens, pro, tokens)
    assert_covers(decode_bytes(pro, 2), measured)


@torch.inference_mode()
def test_module_estimates_at_release_widths():
    """The activation formulas at the released models' widths (random weights, bfloat16, one image)."""
    dtype = torch.bfloat16
    decoder = Decoder(128, (1, 1, 2, 2, 4), 2, 256).to(dtype)  # VQ-16
    _, measured = peak_allocated(decoder, torch.randn(1, 256, *RELEASE_GRID, dtype=dtype))
    assert_covers(decoder_activation_bytes(128, (1, 1, 2, 2, 4), RELEASE_GRID, 1, dtype), measured)

    encoder = ShallowUViTEncoder(4, 768, 2048).to(dtype)  # JanusFlow-1.3B
    z = torch.randn(1, 4, 48, 48, dtype=dtype).contiguous(memory_format=torch.channels_last)
    (z_emb, t_emb, _), measured = peak_allocated(encoder, z, torch.full((1,), 500.0, dtype=dtype))
    assert_covers(convnext_activation_bytes(768, 576, 1, dtype), measured)
    decoder = ShallowUViTDecoder(768, 4, 2048, skip_channels=768).to(dtype)
    h = torch.randn(1, 24, 24, 768, dtype=dtype).permute(0, 3, 1, 2)  # the LLM output's layout in the sampler
    _, measured = peak_allocated(decoder, h, [z_emb], t_emb)
    assert_covers(convnext_activation_bytes(2 * 768, 576, 1, dtype), measured)

    vq = VQModel(128, (1, 1, 2, 2, 4), 256, 16384, 8).to(dtype)  # VQ-16's encoder and codebook search
    _, measured = peak_allocated(vq.encode_to_codes, torch.randn(1, 3, 384, 384, dtype=dtype))
    assert_covers(encoder_activation_bytes(128, (1, 1, 2, 2, 4), 16384, 384, 1, dtype), measured)

    vit = SigLIPViT(384, 16, 1024, 2, 16, 4.0).to(dtype)  # siglip_large_patch16_384, two of its 24 blocks
    _, measured = peak_allocated(vit, torch.randn(1, 3, 384, 384, dtype=dtype))
    assert_covers(vit_activation_bytes(1024, 4.0, 576, 1, dtype), measured)
