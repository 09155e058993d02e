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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import JanusError
from .llm import KVCache
from .model import JanusModel
from .prompts import IMAGE_TOKENS, check_same_model, encode_prompt, model_key
from .sampling import row_generators

logger = logging.getLogger(__name__)

SDXL_VAE_SCALING = 0.13025
LATENT_SIZE = 48  # 384 px / 8 (SDXL-VAE downsampling)

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True, eq=False)
class FlowCFG:
    """Conditional / unconditional prompt rows of a JanusFlow generation for ``batch_size`` images.

    ``input_ids [L]``: the positive prompt (BOS ... ``<begin_of_image>``). ``rows [2B, L']``: block layout,
    cond rows first, uncond rows after (the reference pad row, or the negative prompt); shorter prompts
    are left-padded so both share ``L'``. ``valid [2B, L'-1]`` (bool): the prompt positions the LLM may
    attend (the last token is dropped, its position is taken by the time embedding). CPU tensors.
    ``variant``/``model_folder`` identify the model whose tokenizer built the rows.
    """

    input_ids: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor
    batch_size: int
    variant: str
    model_folder: str
    prompt: str
    negative_prompt: str | None = None

    @property
    def prompt_len(self) -> int:
        """Prompt positions fed to the LLM (``L' - 1``)."""
        return self.valid.shape[1]

    def attention_mask(self) -> torch.Tensor:
        """The reference's 2-D mask ``[2B, (L'-1) + 1 + 576]`` int32 (1 = attend): prompt, t_emb, z tokens."""
        image = torch.ones(self.valid.shape[0], 1 + IMAGE_TOKENS, dtype=torch.int32)
        return torch.cat([self.valid.to(torch.int32), image], dim=1)


@dataclass(frozen=True, eq=False)
class FlowStep:
    """One ODE step's internals (rows ``[0, B)`` cond; ``v_uncond`` is None when ``cfg_weight == 1``).

    ``step`` is 0-based, of ``steps``; ``t [B]`` the time fed to the encoder (0..1000); ``t_emb [B, hidden]``;
    ``v_cond``/``v_uncond``/``velocity`` and ``z`` (after the step) are ``[B, 4, 48, 48]`` in model space.
    """

    step: int
    t: torch.Tensor
    t_emb: torch.Tensor
    v_cond: torch.Tensor
    v_uncond: torch.Tensor | None
    velocity: torch.Tensor
    z: torch.Tensor
    steps: int

    def predicted_clean(self) -> torch.Tensor:
        """The final latent this step's velocity points at, ``z + (1 - t_after) * velocity`` ``[B, 4, 48, 48]``.

        Rectified flow moves in straight lines from noise (t = 0) to the image (t = 1), so this is the image
        the sampler would reach if the velocity stayed constant: a clean preview long before the last step
        (equal to ``z`` after it).
        """
        return self.z + (1.0 - (self.step + 1) / self.steps) * self.velocity


def _require_flow(model: JanusModel) -> None:
    if not model.is_flow:
        raise JanusError(
            f"This is a {model.variant} model (autoregressive VQ tokens); the flow sampler needs a JanusFlow "
            "checkpoint such as JanusFlow-1.3B. Use the AR token sampler (generate_image_tokens) instead."
        )


def build_flow_cfg(model: JanusModel, prompt: str, batch_size: int = 1,
                   negative_prompt: str | None = None) -> FlowCFG:
    """Template and tokenise ``prompt`` and build the CFG rows for ``batch_size`` images.

    Without ``negative_prompt`` (or with an empty one) the uncond rows are the reference's: BOS, then pads
    that are masked out. Otherwise they are the negative prompt's tokens (same template), and the shorter
    of the two prompts is left-padded with masked pads.
    """
    _require_flow(model)
    if int(batch_size) < 1:
        raise JanusError(f"batch_size must be >= 1, got {batch_size}.")
    b = int(batch_size)
    cond = encode_prompt(model, prompt).ids.tolist()
    pad = model.tokenizer.pad_id
    if negative_prompt is None or not negative_prompt.strip():
        negative_prompt = None
        uncond = [cond[0]] + [pad] * (len(cond) - 1)
        uncond_valid = [True] + [False] * (len(cond) - 1)
    else:
        uncond = encode_prompt(model, negative_prompt, "negative prompt").ids.tolist()
        uncond_valid = [True] * len(uncond)
    length = max(len(cond), len(uncond))
    rows = torch.full((2, length), pad, dtype=torch.long)
    valid = torch.zeros(2, length, dtype=torch.bool)
    for i, (ids, ok) in enumerate(((cond, [True] * len(cond)), (uncond, uncond_valid))):
        rows[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        valid[i, length - len(ids):] = torch.tensor(ok)
    order = torch.tensor([0, 1]).repeat_interleave(b)
    return FlowCFG(
        input_ids=torch.tensor(cond, dtype=torch.long), rows=rows[order], valid=valid[order, :-1],
        batch_size=b, variant=model.variant, model_folder=model_key(model), prompt=prompt,
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


def initial_noise(model: JanusModel, batch_size: int, seed: int) -> torch.Tensor:
    """Starting latent ``[B, 4, 48, 48]`` in the U-ViT's dtype (``model.precision.flow``) on the model's device.

    Row ``i`` is drawn with its own CPU generator seeded ``seed + i`` (:func:`sampling.row_generators`), in
    float32, then cast; so results do not depend on the device, and image ``i`` can be regenerated alone.
    (The reference draws with the global CPU generator directly in bfloat16.)
    """
    shape = _latent_shape(model, 1)
    gens = row_generators(seed, batch_size, torch.device("cpu"))
    z = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
    return z.to(device=model.device, dtype=model.precision.flow)


def _check_run_args(model: JanusModel, pair: FlowCFG, z: torch.Tensor, steps: int, cfg_weight: float) -> None:
    _require_flow(model)
    _check_pair(model, pair)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise JanusError(f"steps must be a whole number >= 1, got {steps!r}.")
    if not math.isfinite(cfg_weight) or cfg_weight < 0:
        raise JanusError(f"cfg_weight must be >= 0 (1 = no guidance, 2 = the default), got {cfg_weight}.")
    expected = _latent_shape(model, pair.batch_size)
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or tuple(z.shape) != expected:
        got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise JanusError(f"The initial noise must be a float tensor of shape {list(expected)} "
                         f"(batch {pair.batch_size}), got {got}.")


@torch.inference_mode()
def iter_flow_steps(model: JanusModel, pair: FlowCFG, noise: torch.Tensor, steps: int = 30,
                    cfg_weight: float = 2.0) -> Iterator[FlowStep]:
    """Run the Euler ODE from ``noise [B, 4, 48, 48]`` and yield a :class:`FlowStep` after every step.

    The last yielded ``z`` is the final latent (model space). Arguments as :func:`generate_flow_latents`.
    """
    _check_run_args(model, pair, noise, steps, cfg_weight)
    net, runner, device = model.net, model.llm, model.device
    dtype, llm_dtype = model.precision.flow, model.precision.llm  # U-ViT side, LLM side
    b, prefix_len = pair.batch_size, pair.prompt_len
    guided = cfg_weight != 1.0
    groups = 2 if guided else 1
    # Prefill each distinct prompt row once, then hand it to every image's row.
    distinct = torch.arange(groups) * b
    prefix = KVCache.allocate(runner, groups, prefix_len, with_mask=True)
    runner.forward(runner.embed(pair.rows[distinct, :prefix_len].to(device)), prefix,
                   new_valid=pair.valid[distinct].to(device))
    cache = KVCache.allocate(runner, groups * b, prefix_len + 1 + IMAGE_TOKENS, with_mask=True)
    prefix.copy_prefix_into(cache, slice(None), torch.arange(groups, device=device).repeat_interleave(b))
    del prefix

    z = noise.to(device=device, dtype=dtype)
    dt = torch.full_like(z, 1.0 / steps)
    for step in range(steps):
        t = torch.full((b,), step / steps * 1000.0, device=device).to(dtype)
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
        yield FlowStep(step, t, t_emb, v_cond, v_uncond, v, z, steps)


def generate_flow_latents(model: JanusModel, prompt: str | FlowCFG, batch_size: int | None = None,
                          seed: int = 0, steps: int = 30, cfg_weight: float = 2.0,
                          negative_prompt: str | None = None, noise: torch.Tensor | None = None,
                          callback: StepCallback | None = None) -> torch.Tensor:
    """Generate final latents ``[B, 4, 48, 48]`` (model space; the U-ViT's dtype, model device) for ``prompt``.

    ``prompt`` is text or a :class:`FlowCFG` (which then fixes the batch size and the negative prompt;
    ``batch_size`` defaults to 1 for text). ``noise`` replaces the seeded starting latent (see
    :func:`initial_noise`). ``cfg_weight`` 1 = no guidance. ``callback(step, total, z)`` runs after every
    step with ``step`` = steps done (1..total); an exception from it stops the loop and propagates.
    Decode with ``vae.decode(latent_to_sdxl_vae(z))``.
    """
    _require_flow(model)
    if not isinstance(prompt, str):
        _check_pair(model, prompt)
        if batch_size is not None and batch_size != prompt.batch_size:
            raise JanusError(f"batch_size {batch_size} disagrees with the CFG pair's batch size "
                             f"{prompt.batch_size}; the pair fixes the batch size.")
        if negative_prompt is not None:
            raise JanusError("A CFG pair already holds the negative prompt; pass it to build_flow_cfg "
                             "instead.")
        pair = prompt
    else:
        pair = build_flow_cfg(model, prompt, 1 if batch_size is None else batch_size, negative_prompt)
    z = initial_noise(model, pair.batch_size, seed) if noise is None else noise
    final = None
    for st in iter_flow_steps(model, pair, z, steps, cfg_weight):
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
    "generate_flow_latents",
    "initial_noise",
    "iter_flow_steps",
    "latent_to_sdxl_vae",
    "sdxl_vae_to_latent",
]
