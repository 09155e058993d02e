"""JanusFlow text-to-image: rectified-flow ODE in the SDXL-VAE latent space (spec §4.4).

Reference loop (DeepSeek's ``demo/app_janusflow.py``): rows ``[0, B)`` see the templated prompt, rows
``[B, 2B)`` only its BOS (the rest is padding, masked out). The prompt's last token (``<begin_of_image>``)
is dropped; its position holds the time embedding, followed by the 576 latent tokens. At step ``k`` of
``n`` (``t = k / n * 1000``) the ShallowUViT encoder embeds ``z``, the LLM runs over
``[prompt, t_emb, z tokens]``, the decoder turns the last 576 hidden states into a velocity, CFG mixes it
as ``w * v_cond - (w - 1) * v_uncond`` and Euler moves ``z += v / n``.

What we do differently, with identical results: the prompt's KV is prefilled once (one row per distinct
prompt, copied to every image) and each step feeds only the 577 new tokens per row on top of it (the
reference re-runs the whole prompt every step); the encoder runs once on ``z`` instead of on ``cat([z, z])``
(both halves are the same); with ``cfg_weight == 1`` (``v = v_cond`` exactly) the unconditional rows are
skipped.

Latent spaces: the sampler's ``z`` is in the model's own space, i.e. the SDXL-VAE latent *times* 0.13025.
See :func:`latent_to_sdxl_vae` for what ComfyUI's ``LATENT`` holds.

Image-conditioned runs (img2img, inpainting) start from an input latent instead of pure noise; the schedule rule
and the formulas are in :func:`iter_flow_steps`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arguments import finite_number, whole_number
from .config import FLOW_GRID, FLOW_LATENT_SIZE
from .errors import JanusError
from .llm import forward_bytes, kv_cache_bytes, work_buffer_bytes
from .memory import check_fits
from .model import JanusModel
from .modules.uvit import convnext_activation_bytes
from .prefill import left_pad, prefill_rows
from .prompts import IMAGE_TOKENS, PromptTokens, check_same_model, encode_prompt, is_blank, model_key, prompt_text
from .sampling import GENERATOR_BYTES, check_guidance_weight, check_seed, row_generators

logger = logging.getLogger(__name__)

MAX_STEPS = 10_000  # far beyond any useful schedule; the schedule is a list of steps + 1 times
SDXL_VAE_SCALING = 0.13025
VAE_DOWNSCALE = 8  # SDXL-VAE pixels per latent pixel
LATENT_SIZE = FLOW_LATENT_SIZE  # 384 px / 8

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True, eq=False)
class FlowCFG:
    """Conditional / unconditional prompt rows of a JanusFlow generation for ``batch_size`` images.

    ``input_ids [L]``: the positive prompt (BOS ... ``<begin_of_image>``). ``group_rows [2, L']``: the cond
    row and the uncond row (the reference pad row, or the negative prompt), which every image shares; shorter
    prompts are left-padded so both share ``L'``. ``group_valid [2, L'-1]`` (bool): the prompt positions the
    LLM may attend (the last token is dropped, its position is taken by the time embedding). CPU tensors.
    ``rows`` / ``valid`` expand them to the reference's per-image layout. ``variant``/``model_folder``
    identify the model whose tokenizer built the rows.
    """

    input_ids: torch.Tensor
    group_rows: torch.Tensor
    group_valid: torch.Tensor
    batch_size: int
    variant: str
    model_folder: str
    prompt: str
    negative_prompt: str | None = None

    @property
    def prompt_len(self) -> int:
        """Prompt positions fed to the LLM (``L' - 1``)."""
        return self.group_valid.shape[1]

    @property
    def rows(self) -> torch.Tensor:
        """``[2B, L']`` block layout, cond rows first (built on each access; the sampler uses ``group_rows``)."""
        return self.group_rows.repeat_interleave(self.batch_size, dim=0)

    @property
    def valid(self) -> torch.Tensor:
        """``[2B, L'-1]`` bool, the layout of :attr:`rows`."""
        return self.group_valid.repeat_interleave(self.batch_size, dim=0)

    def attention_mask(self) -> torch.Tensor:
        """The reference's 2-D mask ``[2B, (L'-1) + 1 + 576]`` int32 (1 = attend): prompt, t_emb, z tokens."""
        image = torch.ones(self.valid.shape[0], 1 + IMAGE_TOKENS, dtype=torch.int32)
        return torch.cat([self.valid.to(torch.int32), image], dim=1)


@dataclass(frozen=True, eq=False)
class FlowStep:
    """One ODE step's internals (rows ``[0, B)`` cond; ``v_uncond`` is None when ``cfg_weight == 1``).

    ``step`` is 0-based, of ``steps``; ``t [B]`` the time fed to the encoder (0..1000); ``t_emb [B, hidden]``;
    ``v_cond``/``v_uncond``/``velocity`` and ``z`` (after the step) are ``[B, 4, 48, 48]`` in model space.
    ``t_next`` is the time (0..1) ``z`` has reached (1.0 after the last step). Inpainting runs also carry the
    input latent ``init_latent [B, 4, 48, 48]`` and ``noise_mask [B, 1, 48, 48]`` (1 = regenerate).
    """

    step: int
    t: torch.Tensor
    t_emb: torch.Tensor
    v_cond: torch.Tensor
    v_uncond: torch.Tensor | None
    velocity: torch.Tensor
    z: torch.Tensor
    steps: int
    t_next: float
    init_latent: torch.Tensor | None = None
    noise_mask: torch.Tensor | None = None

    def predicted_clean(self) -> torch.Tensor:
        """The final latent this step's velocity points at, ``z + (1 - t_next) * velocity`` ``[B, 4, 48, 48]``.

        Rectified flow moves in straight lines from noise (t = 0) to the image (t = 1), so this is the image
        the sampler would reach if the velocity stayed constant: a clean preview long before the last step
        (equal to ``z`` after it). With a noise mask, the kept region shows the input latent it ends at:
        ``m * clean + (1 - m) * init_latent``.
        """
        clean = self.z + (1.0 - self.t_next) * self.velocity
        if self.noise_mask is None:
            return clean
        return self.noise_mask * clean + (1.0 - self.noise_mask) * self.init_latent


def _require_flow(model: JanusModel, img2img: bool = False) -> None:
    if not model.is_flow and img2img:
        raise JanusError(
            f"init_latent (img2img from an SDXL-VAE LATENT) needs a JanusFlow model; this is a {model.variant} "
            "model, whose images are VQ tokens. Load JanusFlow-1.3B, or start an autoregressive model from an "
            "image with init_tokens (encode_image_tokens / Janus VQ Encode)."
        )
    if not model.is_flow:
        raise JanusError(
            f"This is a {model.variant} model (autoregressive VQ tokens); the flow sampler needs a JanusFlow "
            "checkpoint such as JanusFlow-1.3B. Use the 'Janus AR Token Sampler' node (python -m janus_core "
            "generate; generate_image_tokens in Python) instead."
        )


def build_flow_cfg(model: JanusModel, prompt: str | PromptTokens, batch_size: int = 1,
                   negative_prompt: str | PromptTokens | None = None) -> FlowCFG:
    """Template and tokenise ``prompt`` and build the CFG rows for ``batch_size`` images (prompts may come as
    :class:`PromptTokens` of this model, e.g. from ComfyUI's Prompt Encoder).

    Without ``negative_prompt`` (or with an empty one) the uncond rows are the reference's: BOS, then pads
    that are masked out. Otherwise they are the negative prompt's tokens (same template), and the shorter
    of the two prompts is left-padded with masked pads.
    """
    _require_flow(model)
    b = whole_number("batch_size", batch_size, minimum=1)
    prompt = prompt_text(model, prompt, "prompt")
    negative_prompt = None if negative_prompt is None else prompt_text(model, negative_prompt, "negative prompt")
    cond = encode_prompt(model, prompt).ids.tolist()
    pad = model.tokenizer.pad_id
    if is_blank(negative_prompt):
        negative_prompt = None
        uncond = [cond[0]] + [pad] * (len(cond) - 1)
        uncond_valid = [True] + [False] * (len(cond) - 1)
    else:
        uncond = encode_prompt(model, negative_prompt, "negative prompt").ids.tolist()
        uncond_valid = [True] * len(uncond)
    rows, _ = left_pad([torch.tensor(cond, dtype=torch.long), torch.tensor(uncond, dtype=torch.long)], pad)
    valid, _ = left_pad([torch.ones(len(cond), dtype=torch.bool), torch.tensor(uncond_valid)], False)
    return FlowCFG(
        input_ids=torch.tensor(cond, dtype=torch.long), group_rows=rows, group_valid=valid[:, :-1], batch_size=b,
        variant=model.variant, model_folder=model_key(model), prompt=prompt,
        negative_prompt=negative_prompt,
    )


def _check_pair(model: JanusModel, pair: FlowCFG) -> None:
    if not isinstance(pair, FlowCFG):
        raise JanusError(f"Expected a JanusFlow CFG pair (FlowCFG), got {type(pair).__name__}; build it with "
                         "build_flow_cfg (the AR CFG pair does not work with the flow sampler).")
    check_same_model(model, pair.variant, pair.model_folder, "CFG pair")
    limit = model.config.llm.max_position_embeddings
    if pair.prompt_len + 1 + IMAGE_TOKENS > limit:
        raise JanusError(f"The prompt ({pair.prompt_len} tokens) plus {1 + IMAGE_TOKENS} image positions "
                         f"exceeds the model's context of {limit}. Shorten it.")


def _latent_shape(model: JanusModel, batch: int) -> tuple[int, int, int, int]:
    return (batch, model.config.flow.latent_channels, LATENT_SIZE, LATENT_SIZE)


def noise_bytes(model: JanusModel, batch_size: int) -> int:
    """CPU bytes :func:`initial_noise` allocates: a generator per image, the float32 rows drawn, joined and cast."""
    latent = math.prod(_latent_shape(model, batch_size)) * 4
    return batch_size * GENERATOR_BYTES + 3 * latent


def initial_noise(model: JanusModel, batch_size: int, seed: int, offsets: Sequence[int] | None = None
                  ) -> torch.Tensor:
    """Starting latent ``[B, 4, 48, 48]`` in the U-ViT's dtype (``model.precision.flow``) on the model's device.

    Row ``i`` is drawn with its own CPU generator seeded ``seed + i`` (or ``seed + offsets[i]``; mod 2**64,
    :func:`sampling.row_generators`), in float32, then cast; so results do not depend on the device, and image
    ``i`` can be regenerated alone.
    (The reference draws with the global CPU generator directly in bfloat16.) Refused with a
    :class:`JanusError` when :func:`noise_bytes` does not fit the free RAM.
    """
    shape = _latent_shape(model, 1)
    batch_size = whole_number("batch_size", batch_size, minimum=1)
    check_fits("cpu", noise_bytes(model, batch_size), "JanusFlow starting noise", batch_size)
    gens = row_generators(seed, batch_size, torch.device("cpu"), offsets)
    z = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
    return z.to(device=model.device, dtype=model.precision.flow)


def flow_bytes(model: JanusModel, pair: FlowCFG, cfg_weight: float = 2.0, image_input: bool = False) -> int:
    """Peak bytes :func:`iter_flow_steps` allocates on the model's device for ``pair`` (beyond the weights).

    Held through the run: the KV cache of ``2B`` rows (``B`` when ``cfg_weight == 1``) x (prompt + 577) positions
    and the latents (``image_input``: also the input latent, its mask and the re-noised input). On top, the
    largest phase: the prompt prefill; the UViT encoder on ``B`` latents; or a step's LLM inputs with either the
    LLM forward over 577 positions or the LLM output, its norm and the UViT decoder.
    """
    _require_flow(model, img2img=image_input)
    f, spec, dtype, device = model.config.flow, model.config.llm, model.dtype, model.device
    uvit_dtype = model.precision.flow  # the U-ViT may run in float32 where the LLM runs in bfloat16
    size, hidden = dtype.itemsize, spec.hidden_size
    b = pair.batch_size
    groups = 2 if cfg_weight != 1.0 else 1
    rows, prompt = groups * b, pair.prompt_len
    new, grid = 1 + IMAGE_TOKENS, FLOW_GRID * FLOW_GRID  # the U-ViT's feature grid (config.py checks it)
    context = prompt + new
    prefill = kv_cache_bytes(spec, groups, prompt, dtype) + forward_bytes(spec, groups, prompt, prompt, dtype, device)
    # noise, z, dt, next z (float32 at most); with an input latent: it, the re-noised input and a blend (the mask
    # has one channel)
    latents = (7 if image_input else 4) * b * f.latent_channels * LATENT_SIZE * LATENT_SIZE * 4
    encoder = convnext_activation_bytes(f.enc_channels, grid, b, uvit_dtype)
    inputs = (b * grid + rows * new) * hidden * size + rows * f.enc_channels * grid * size  # tokens, x, skip
    llm = forward_bytes(spec, rows, new, context, dtype, device)
    decoder = (work_buffer_bytes(spec, rows, new, dtype) + rows * new * hidden * size  # LLM buffers and output
               + rows * grid * hidden * (8 + 2 * size)  # its float32 norm
               + convnext_activation_bytes(f.enc_channels + f.dec_channels, grid, rows, uvit_dtype))
    held = kv_cache_bytes(spec, rows, context, dtype) + latents
    return held + max(prefill, encoder, inputs + max(llm, decoder))


def _check_fits(model: JanusModel, pair: FlowCFG, cfg_weight: float, image_input: bool) -> None:
    check_fits(model.device, flow_bytes(model, pair, cfg_weight, image_input), "JanusFlow generation",
               pair.batch_size)


def _check_run_args(model: JanusModel, pair: FlowCFG, z: torch.Tensor, steps: int, cfg_weight: float
                    ) -> tuple[int, float]:
    """Raise for unusable arguments; returns ``(steps, cfg_weight)`` as int and float."""
    _require_flow(model)
    _check_pair(model, pair)
    steps = whole_number("steps", steps, minimum=1)
    if steps > MAX_STEPS:
        raise JanusError(f"steps must be at most {MAX_STEPS} (got {steps}); 20-50 is typical.")
    cfg_weight = check_guidance_weight(cfg_weight)
    expected = _latent_shape(model, pair.batch_size)
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or tuple(z.shape) != expected:
        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise JanusError(f"The initial noise must be a float tensor of shape {list(expected)} "
                         f"(batch {pair.batch_size}), got {got}.")
    if not bool(torch.isfinite(z).all()):
        raise JanusError("The initial noise contains NaN or infinite values; pass finite noise (or none: the seed "
                         "draws it).")
    return steps, cfg_weight


def check_denoise(denoise: object) -> float:
    """``denoise`` as a float in (0, 1]; NaN, infinities, 0 and values above 1 are refused."""
    d = finite_number("denoise", denoise)
    if not 0.0 < d <= 1.0:
        raise JanusError(f"denoise must be in (0, 1] (1 = from pure noise, close to 0 = keep the input latent), "
                         f"got {d}.")
    return d


def flow_times(steps: int, denoise: float = 1.0) -> list[float]:
    """The ``steps + 1`` times (0..1) a run passes: ``t_k = (1 - denoise) + denoise * k / steps``, ``t_steps = 1``.

    With ``denoise = 1`` these are the reference's ``k / steps`` exactly (the encoder gets ``t_k * 1000``).
    """
    times = [(1.0 - denoise) + denoise * k / steps for k in range(steps)]
    return [*times, 1.0]


def _image_latent(model: JanusModel, init_latent: object, batch: int) -> torch.Tensor:
    """``init_latent [1 or B, C, 48, 48]`` checked, as ``[B, C, 48, 48]`` in the model's dtype and device."""
    channels = model.config.flow.latent_channels
    side, pixels = LATENT_SIZE, LATENT_SIZE * VAE_DOWNSCALE
    expected = f"[{'1' if batch == 1 else f'{batch} or 1'}, {channels}, {side}, {side}]"
    if not isinstance(init_latent, torch.Tensor) or not init_latent.is_floating_point() or init_latent.dim() != 4:
        got = (f"{init_latent.dtype} of shape {list(init_latent.shape)}" if isinstance(init_latent, torch.Tensor)
               else type(init_latent).__name__)
        raise JanusError(f"init_latent must be a float tensor {expected} (the SDXL-VAE latent of a {pixels}x"
                         f"{pixels} image in JanusFlow's space: sdxl_vae_to_latent of VAE Encode's samples), "
                         f"got {got}.")
    n, c, h, w = init_latent.shape
    if c != channels:
        raise JanusError(f"init_latent has {c} channels, JanusFlow latents have {channels}: encode the image with "
                         f"the SDXL VAE (sdxl_vae.safetensors), not another model's VAE.")
    if (h, w) != (side, side):
        raise JanusError(f"init_latent is {h}x{w} (the latent of a {h * VAE_DOWNSCALE}x{w * VAE_DOWNSCALE} image); "
                         f"JanusFlow works on {side}x{side} latents: encode a {pixels}x{pixels} image (scale or "
                         f"crop it to {pixels}x{pixels} before VAE Encode).")
    if n not in (1, batch):
        fix = "give one latent for every image or one per image" + (f" (or set batch_size to {n})" if n else "")
        raise JanusError(f"init_latent has a batch of {n}, the generation {batch} image(s): {fix}.")
    if not bool(torch.isfinite(init_latent).all()):
        raise JanusError("init_latent contains NaN/infinite values; encode the image again (in float32 or "
                         "bfloat16: the SDXL VAE overflows in float16).")
    return init_latent.to(device=model.device, dtype=model.precision.flow).expand(batch, -1, -1, -1)


def _latent_noise_mask(model: JanusModel, noise_mask: object, batch: int) -> torch.Tensor:
    """ComfyUI's ``noise_mask`` (``[H, W]``, ``[1 or B, H, W]`` or ``[1 or B, 1, H, W]``, square, values 0..1)
    -> ``[B, 1, 48, 48]`` in the model's dtype and device, resized bilinearly as ComfyUI does."""
    pixels = LATENT_SIZE * VAE_DOWNSCALE
    counts = "1" if batch == 1 else f"1 or {batch}"
    what = (f"noise_mask must be a tensor [H, W], [N, H, W] or [N, 1, H, W] with N = {counts}, square "
            f"(the {pixels}x{pixels} image's mask or its {LATENT_SIZE}x{LATENT_SIZE} latent mask), values 0..1 "
            f"(1 = regenerate)")
    if not isinstance(noise_mask, torch.Tensor):
        raise JanusError(f"{what}; got {type(noise_mask).__name__}.")
    shape = list(noise_mask.shape)
    if not 2 <= noise_mask.dim() <= 4 or (noise_mask.dim() == 4 and shape[1] != 1):
        raise JanusError(f"{what}; got shape {shape}.")
    mask = noise_mask.reshape(-1, 1, *shape[-2:])
    n, _, h, w = mask.shape
    if h != w or h == 0:
        raise JanusError(f"{what}; got a {h}x{w} mask: scale and crop the mask like the image.")
    if n not in (1, batch):
        raise JanusError(f"{what}; got {n} masks for {batch} image(s).")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise JanusError(f"{what}; got {noise_mask.dtype} values.")
    mask = mask.float()
    if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0.0 or float(mask.max()) > 1.0:
        raise JanusError(f"{what}; got values outside 0..1 (or NaN).")
    if h != LATENT_SIZE:
        mask = F.interpolate(mask, size=(LATENT_SIZE, LATENT_SIZE), mode="bilinear")
    return mask.to(device=model.device, dtype=model.precision.flow).expand(batch, -1, -1, -1)


def _renoised(init_latent: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """The input latent re-noised to time ``t`` on the straight line: ``t * x + (1 - t) * noise``."""
    return t * init_latent + (1.0 - t) * noise


@torch.inference_mode()
def iter_flow_steps(model: JanusModel, pair: FlowCFG, noise: torch.Tensor, steps: int = 30,
                    cfg_weight: float = 2.0, init_latent: torch.Tensor | None = None, denoise: float = 1.0,
                    noise_mask: torch.Tensor | None = None) -> Iterator[FlowStep]:
    """Run the Euler ODE from ``noise [B, 4, 48, 48]`` and yield a :class:`FlowStep` after every step.

    Time runs from noise (t = 0) to the image (t = 1); the encoder sees ``t * 1000``. The run takes ``steps``
    Euler steps over ``[1 - denoise, 1]``, at the times of :func:`flow_times`:

    - ``t_k = (1 - denoise) + denoise * k / steps`` (k = 0..steps; ``t_steps = 1``), step size
      ``denoise / steps``: ``z <- z + velocity * denoise / steps``.
    - Start: ``z = noise`` without ``init_latent`` (``denoise`` must then be 1); with it (``x``, model space),
      ``z = t_0 * x + (1 - t_0) * noise`` -- the input re-noised to ``t_0`` on rectified flow's straight line.
    - ``noise_mask`` ``m`` (1 = regenerate, 0 = keep; resized to 48x48): after every step the kept part is put
      back on the input's line, ``z <- m * z + (1 - m) * (t_next * x + (1 - t_next) * noise)``, so it ends at
      ``x`` itself after the last step (``t_steps = 1``).

    Like ComfyUI's KSampler, ``steps`` counts the steps actually run: ``denoise = 0.5`` with 30 steps makes 30
    model calls between t = 0.5 and 1, the times of the last 30 steps of a 60-step run (KSampler rounds the
    longer schedule to ``int(steps / denoise)`` steps; here ``t_0 = 1 - denoise`` exactly). ``denoise = 1``
    without a mask is the text-to-image run bit for bit, with or without ``init_latent``; ``denoise -> 0``
    returns ``init_latent``. The last yielded ``z`` is the final latent (model space). Other arguments as
    :func:`generate_flow_latents`. Refused with a :class:`JanusError` when :func:`flow_bytes` does not fit the
    device's free memory.
    """
    _require_flow(model, img2img=init_latent is not None)
    steps, cfg_weight = _check_run_args(model, pair, noise, steps, cfg_weight)
    denoise = check_denoise(denoise)
    if init_latent is None and (denoise != 1.0 or noise_mask is not None):
        raise JanusError(f"{'denoise < 1' if noise_mask is None else 'A noise_mask'} needs an input latent "
                         "(init_latent: the VAE-encoded image to start from); without one use denoise = 1 "
                         "and no mask.")
    init = None if init_latent is None else _image_latent(model, init_latent, pair.batch_size)
    mask = None if noise_mask is None else _latent_noise_mask(model, noise_mask, pair.batch_size)
    net, runner, device = model.net, model.llm, model.device
    dtype, llm_dtype = model.precision.flow, model.precision.llm  # U-ViT side, LLM side
    b, prefix_len = pair.batch_size, pair.prompt_len
    guided = cfg_weight != 1.0
    groups = 2 if guided else 1
    _check_fits(model, pair, cfg_weight, init is not None)
    # Prefill each distinct prompt row once, then hand it to every image's row.
    cache, _ = prefill_rows(runner, runner.embed(pair.group_rows[:groups, :prefix_len].to(device)),
                            prefix_len + 1 + IMAGE_TOKENS, b, valid=pair.group_valid[:groups].to(device))

    noise = noise.to(device=device, dtype=dtype)
    times = flow_times(steps, denoise)
    z = noise if init is None else _renoised(init, noise, times[0])
    dt = torch.full_like(z, denoise / steps)
    for step in range(steps):
        t = torch.full((b,), times[step] * 1000.0, device=device).to(dtype)
        # channels-last input keeps every conv output channels-last, so the encoder's channel-wise linears
        # (on NHWC permutes) see contiguous rows instead of falling back to a batched matmul with copies
        z_emb, t_emb, _ = net.vision_gen_enc_model(z.contiguous(memory_format=torch.channels_last), t)
        grid = z_emb.shape[-2:]
        tokens = net.vision_gen_enc_aligner(z_emb.flatten(2).transpose(1, 2))  # [B, 576, hidden]
        x = torch.cat([t_emb[:, None], tokens], dim=1).to(llm_dtype)  # [B, 577, hidden]
        skip, cond_t = z_emb, t_emb
        if guided:
            # cat, not repeat: it keeps z_emb's channels-last layout, which the decoder's channel-wise
            # linears need to stay plain matmuls (a repeat makes it NCHW and 4x slower in bf16 on CPU)
            x, skip, cond_t = torch.cat([x, x]), torch.cat([z_emb, z_emb]), torch.cat([t_emb, t_emb])
        cache.length = prefix_len  # drop the previous step's 577 positions, keep the prompt
        h = runner.forward(x, cache)[:, 1:].to(dtype)
        h = net.vision_gen_dec_aligner(net.vision_gen_dec_aligner_norm(h))  # [rows, 576, C]
        h = h.reshape(h.shape[0], *grid, h.shape[-1]).permute(0, 3, 1, 2)
        v = net.vision_gen_dec_model(h, [skip], cond_t)  # [rows, 4, 48, 48]
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = cfg_weight * v_cond - (cfg_weight - 1.0) * v_uncond
        else:
            v_cond, v_uncond = v, None
        z = z + dt * v
        if mask is not None:
            z = mask * z + (1.0 - mask) * _renoised(init, noise, times[step + 1])
        yield FlowStep(step, t, t_emb, v_cond, v_uncond, v, z, steps, times[step + 1], init, mask)


def generate_flow_latents(model: JanusModel, prompt: str | FlowCFG, batch_size: int | None = None,
                          seed: int = 0, steps: int = 30, cfg_weight: float = 2.0,
                          negative_prompt: str | None = None, noise: torch.Tensor | None = None,
                          callback: StepCallback | None = None, init_latent: torch.Tensor | None = None,
                          denoise: float = 1.0, noise_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Generate final latents ``[B, 4, 48, 48]`` (model space; the U-ViT's dtype, model device) for ``prompt``.

    ``prompt`` is text or a :class:`FlowCFG` (which then fixes the batch size and the negative prompt;
    ``batch_size`` defaults to 1 for text). ``noise`` replaces the seeded starting latent (see
    :func:`initial_noise`). ``cfg_weight`` 1 = no guidance. ``callback(step, total, z)`` runs after every
    step with ``step`` = steps done (1..total); an exception from it stops the loop and propagates.
    Decode with ``vae.decode(latent_to_sdxl_vae(z))``. Image ``i`` uses seed ``seed + i`` (mod 2**64; ``seed``
    in 0..2**64 - 1). A batch that does not fit the device's free memory (:func:`flow_bytes`) is refused with a
    :class:`JanusError` before the noise is drawn.

    img2img: ``init_latent [B or 1, 4, 48, 48]`` (model space: ``sdxl_vae_to_latent`` of the SDXL-VAE latent of a
    384x384 image; one latent serves every image) is re-noised to ``t = 1 - denoise`` and the run continues from
    there with ``steps`` steps; ``noise_mask`` (ComfyUI's: ``[H, W]``, ``[B or 1, H, W]`` or
    ``[B or 1, 1, H, W]``, square, 1 = regenerate, resized to 48x48) keeps the rest on the input. The schedule
    and formulas are in :func:`iter_flow_steps`. Image ``i`` still equals a batch of one with seed ``seed + i``
    and ``init_latent[i]``.
    """
    _require_flow(model, img2img=init_latent is not None)
    seed = check_seed(seed)
    if not isinstance(prompt, str):
        _check_pair(model, prompt)
        if batch_size is not None and whole_number("batch_size", batch_size, minimum=1) != prompt.batch_size:
            raise JanusError(f"batch_size {batch_size} disagrees with the CFG pair's batch size "
                             f"{prompt.batch_size}; the pair fixes the batch size.")
        if negative_prompt is not None:
            raise JanusError("A CFG pair already holds the negative prompt; pass it to build_flow_cfg "
                             "instead.")
        pair = prompt
    else:
        pair = build_flow_cfg(model, prompt, 1 if batch_size is None else batch_size, negative_prompt)
    # the whole run before drawing the noise, so a batch that cannot run is refused before anything is allocated
    _check_fits(model, pair, cfg_weight, init_latent is not None)
    z = initial_noise(model, pair.batch_size, seed) if noise is None else noise
    final = None
    for st in iter_flow_steps(model, pair, z, steps, cfg_weight, init_latent, denoise, noise_mask):
        final = st.z
        if callback is not None:
            callback(st.step + 1, steps, final)
    logger.debug("flow: %d steps, batch %d, cfg %.3g", steps, pair.batch_size, cfg_weight)
    return final


def latent_to_sdxl_vae(z: torch.Tensor) -> torch.Tensor:
    """Model-space latent -> unscaled SDXL-VAE latent (``z / 0.13025``): what ComfyUI's ``LATENT`` holds.

    ComfyUI keeps ``LATENT["samples"]`` in the raw VAE latent space: ``VAEDecode`` (nodes.py) calls
    ``VAE.decode`` (comfy/sd.py), which hands the samples straight to ``first_stage_model.decode``
    (comfy/ldm/models/autoencoder.py: post_quant_conv + decoder, no scaling). The SDXL factor
    (comfy/latent_formats.py ``SDXL.scale_factor = 0.13025``) is applied only around sampling, by
    ``process_latent_in``/``process_latent_out`` (comfy/model_base.py, comfy/samplers.py). So the samples
    must be ``z / 0.13025`` -- the tensor the reference passes to ``vae.decode`` -- for stock VAEDecode
    with ``sdxl_vae.safetensors`` to give the reference image.
    """
    return z / SDXL_VAE_SCALING


def sdxl_vae_to_latent(x: torch.Tensor) -> torch.Tensor:
    """Unscaled SDXL-VAE latent (ComfyUI ``LATENT``) -> model-space latent (``x * 0.13025``)."""
    return x * SDXL_VAE_SCALING


__all__ = [
    "SDXL_VAE_SCALING",
    "FlowCFG",
    "FlowStep",
    "build_flow_cfg",
    "check_denoise",
    "flow_times",
    "generate_flow_latents",
    "initial_noise",
    "iter_flow_steps",
    "latent_to_sdxl_vae",
    "sdxl_vae_to_latent",
]
