"""Token sampling shared by image generation and understanding: CFG mixing, temperature, top-k, top-p.

Every row of a batch draws from its own ``torch.Generator``; row ``i`` of a call with seed ``s`` uses
seed ``s + i``, so image ``i`` of a batch can be regenerated alone with ``seed = s + i, batch_size = 1``.
"""

from __future__ import annotations

import torch

from .errors import JanusError

# Memory estimates: a CPU generator's state (mt19937, ~2.7 kB measured), and the float32 / int64 work of CFG
# mixing and top-k / top-p sampling per logit of one row (measured peak: 32 bytes with CFG, top-k and top-p).
GENERATOR_BYTES = 4096
SAMPLING_BYTES_PER_LOGIT = 40


def check_sampling_args(temperature: float, top_k: int, top_p: float, *, greedy_at_zero: bool = False) -> None:
    """Raise a clear error for settings that cannot sample."""
    if top_k < 0:
        raise JanusError(f"top_k must be >= 0 (0 = off, 1 = greedy), got {top_k}.")
    if not 0.0 < top_p <= 1.0:
        raise JanusError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to turn it off.")
    if temperature < 0 or (temperature == 0 and not greedy_at_zero and top_k != 1):
        raise JanusError(
            f"temperature must be > 0 (got {temperature}); for deterministic output use top_k = 1 (greedy)."
        )


def row_generators(seed: int, batch: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, row ``i`` seeded with ``seed + i`` (on ``device``)."""
    gens = []
    for i in range(batch):
        g = torch.Generator(device=device)
        g.manual_seed((int(seed) + i) % (2**63))
        gens.append(g)
    return gens


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance in logit space: ``uncond + weight * (cond - uncond)``."""
    return uncond + weight * (cond - uncond)


def sample_next(logits: torch.Tensor, generators: list[torch.Generator] | None, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Draw one token per row from ``logits [B, V]``; returns LongTensor ``[B]``.

    ``top_k == 1`` or ``temperature == 0`` is greedy (argmax, no randomness). Otherwise the logits are
    divided by ``temperature``, cut to the ``top_k`` best (0 = no cut) and to the smallest set whose
    probability reaches ``top_p`` (1.0 = no cut), then sampled with each row's generator.
    """
    if top_k == 1 or temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_scores.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
