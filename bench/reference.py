"""Baselines: DeepSeek's reference sampling loops, restated (our own words, same work per step).

* AR (``generation_inference.py``): every one of the ``2B`` CFG rows (cond and uncond interleaved) is
  prefilled; each step runs transformers' ``LlamaModel`` with its default growing ``DynamicCache``, mixes the
  gen-head logits, draws with ``softmax`` + ``multinomial`` and feeds ``gen_aligner(gen_embed(token))`` back
  to both rows of the image.
* JanusFlow (``demo/app_janusflow.py``): its cache handling keeps nothing, so every ODE step runs the LLM
  over ``[prompt, t_emb, z tokens]`` for all ``2B`` rows with the 2-D padding mask, and the encoder over
  ``cat([z, z])``.

Both take the same inputs as our samplers (a CFG pair built by janus_core) so they do the same job.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from janus_core.generate_ar import CFGPair
from janus_core.generate_flow import FlowCFG
from janus_core.llm import cpu_unpack_layers
from janus_core.model import JanusModel
from janus_core.prompts import IMAGE_TOKENS

StepHook = Callable[[int], None]


def plain_gen_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The image-token head as the reference runs it: two ``nn.Linear`` calls around an exact GELU."""
    first, second = head.output_mlp_projector, head.vision_head
    return F.linear(F.gelu(F.linear(hidden, first.weight, first.bias)), second.weight, second.bias)


def _cache_keyword(lm: nn.Module) -> str:
    """The name under which transformers' model ``forward`` takes and returns its KV cache: ``cache`` from
    transformers 5.24 on, ``past_key_values`` before (accepted with a warning until 5.40)."""
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"


@torch.inference_mode()
def reference_ar_tokens(model: JanusModel, pair: CFGPair, steps: int = IMAGE_TOKENS, cfg_weight: float = 5.0,
                        temperature: float = 1.0, past: object | None = None,
                        on_step: StepHook | None = None) -> torch.Tensor:
    """Sample ``steps`` tokens ``[B, steps]`` the reference way; ``on_step(i)`` runs after token ``i``.

    ``past`` (a transformers cache already holding ``2B`` rows) replaces the prefill: the bench uses it to
    time steps late in the 576-token range without prefilling hundreds of positions for every row.
    """
    net, b = model.net, pair.batch_size
    cpu_unpack_layers(net.language_model)  # transformers' forward reads the plain weights
    lm = net.language_model.model
    if past is None:
        if pair.cond_ids.numel() != pair.uncond_ids.numel():
            raise ValueError("the reference loop needs cond and uncond rows of equal length")
        rows = torch.stack([pair.cond_ids, pair.uncond_ids]).repeat(b, 1)  # c0, u0, c1, u1, ...
        embeds = lm.embed_tokens(rows.to(model.device))
    else:
        # any image token embedding works as the step input for a pre-filled cache
        embeds = net.image_token_embeds(torch.zeros(2 * b, dtype=torch.long, device=model.device))[:, None]
    tokens = torch.zeros(b, steps, dtype=torch.long, device=model.device)
    keyword = _cache_keyword(lm)
    for i in range(steps):
        out = lm(inputs_embeds=embeds, use_cache=True, **{keyword: past})
        past = getattr(out, keyword)
        logits = plain_gen_head(net.gen_head, out.last_hidden_state[:, -1, :])
        cond, uncond = logits[0::2], logits[1::2]
        mixed = uncond + cfg_weight * (cond - uncond)
        probs = torch.softmax(mixed / temperature, dim=-1)
        nxt = torch.multinomial(probs, num_samples=1)
        tokens[:, i] = nxt.squeeze(-1)
        both = torch.cat([nxt, nxt], dim=1).view(-1)
        embeds = net.image_token_embeds(both).unsqueeze(1)
        if on_step is not None:
            on_step(i)
    return tokens


@torch.inference_mode()
def reference_flow_latents(model: JanusModel, pair: FlowCFG, z: torch.Tensor, steps: int = 30,
                           cfg_weight: float = 2.0, on_step: StepHook | None = None) -> torch.Tensor:
    """Run the reference Euler loop from ``z [B, 4, 48, 48]`` for ``steps`` steps; returns the final latent."""
    net, device, dtype = model.net, model.device, model.dtype
    cpu_unpack_layers(net.language_model)  # transformers' forward reads the plain weights
    lm = net.language_model.model
    prompt = lm.embed_tokens(pair.rows[:, :-1].to(device))  # [2B, L-1, H]; the last token's slot is t_emb
    mask = pair.attention_mask().to(device)
    z = z.to(device=device, dtype=dtype)
    for step in range(steps):
        z2 = torch.cat([z, z])
        t = torch.full((z2.shape[0],), step / steps * 1000.0, device=device).to(dtype)
        z_emb, t_emb, _ = net.vision_gen_enc_model(z2, t)
        grid = z_emb.shape[-2:]
        tokens = net.vision_gen_enc_aligner(z_emb.flatten(2).transpose(1, 2))
        x = torch.cat([prompt, t_emb[:, None], tokens], dim=1)
        h = lm(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state[:, -IMAGE_TOKENS:]
        h = net.vision_gen_dec_aligner(net.vision_gen_dec_aligner_norm(h))
        h = h.reshape(h.shape[0], *grid, h.shape[-1]).permute(0, 3, 1, 2)
        v = net.vision_gen_dec_model(h, [z_emb], t_emb)
        v_cond, v_uncond = v.chunk(2)
        z = z + (cfg_weight * v_cond - (cfg_weight - 1.0) * v_uncond) / steps
        if on_step is not None:
            on_step(step)
    return z
