"""Token sampling shared by image generation and understanding: CFG mixing, temperature, top-k, top-p.

Every row of a batch draws from its own ``torch.Generator``; row ``i`` of a call with seed ``s`` uses
seed ``(s + i) mod 2**64``, so image ``i`` of a batch can be regenerated alone with that seed and
``batch_size = 1``. Seeds are whole numbers in ``0..2**64 - 1`` (ComfyUI's seed range). torch's CPU
generator uses only the low 32 bits of a seed, so on the CPU seeds that differ by a multiple of 2**32 give
the same result; CUDA generators use all 64 bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .arguments import finite_number, whole_number
from .errors import JanusError

SEED_MAX = 2**64 - 1  # 0xffffffffffffffff, the maximum of ComfyUI's seed widgets

# Memory estimates: a CPU generator's state (mt19937, ~2.7 kB measured), and the float32 / int64 work of CFG
# mixing and top-k / top-p sampling per logit of one row (measured peak: 32 bytes with CFG, top-k and top-p).
GENERATOR_BYTES = 4096
SAMPLING_BYTES_PER_LOGIT = 40


def check_seed(seed: object) -> int:
    """``seed`` as an ``int`` in ``0..SEED_MAX`` (whole numbers only, see :mod:`janus_core.arguments`)."""
    return whole_number("seed", seed, 0, SEED_MAX)


# Beyond these the float32 logits overflow or the division rounds to zero: no sampler setting means that much.
MAX_GUIDANCE_WEIGHT = 1000.0
MIN_TEMPERATURE = 1e-4  # lower is greedy in effect


def check_guidance_weight(value: object, name: str = "cfg_weight", meaning: str = "1 = no guidance") -> float:
    """A guidance weight as a float: finite, in 0..:data:`MAX_GUIDANCE_WEIGHT` (``meaning`` explains the scale in
    the error message)."""
    weight = finite_number(name, value)
    if not 0 <= weight <= MAX_GUIDANCE_WEIGHT:
        raise JanusError(f"{name} must be in 0..{MAX_GUIDANCE_WEIGHT:g} ({meaning}), got {weight}.")
    return weight


def check_sampling_args(temperature: object, top_k: object, top_p: object, *,
                        greedy_at_zero: bool = False) -> tuple[float, int, float]:
    """``(temperature, top_k, top_p)`` checked and converted; raises a clear error for settings that cannot
    sample (NaN/inf, non-integer ``top_k``, out-of-range values). ``greedy_at_zero``: temperature 0 = greedy."""
    temperature = finite_number("temperature", temperature)
    top_k = whole_number("top_k", top_k, minimum=0, hint=" (0 = off, 1 = greedy)")
    top_p = finite_number("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise JanusError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to turn it off.")
    if greedy_at_zero and temperature < 0:
        raise JanusError(f"temperature must be >= 0 (0 = greedy, deterministic), got {temperature}.")
    if temperature < 0 or (temperature == 0 and not greedy_at_zero and top_k != 1):
        raise JanusError(
            f"temperature must be > 0 (got {temperature}); for deterministic output use top_k = 1 (greedy)."
        )
    if 0 < temperature < MIN_TEMPERATURE:
        greedy = "0" if greedy_at_zero else "top_k = 1"
        raise JanusError(f"temperature {temperature:g} is below {MIN_TEMPERATURE:g}, where sampling is greedy in "
                         f"effect; use {greedy} for deterministic output.")
    return temperature, top_k, top_p


def row_generators(seed: int, batch: int, device: torch.device,
                   offsets: Sequence[int] | None = None) -> list[torch.Generator]:
    """One generator per row on ``device``, row ``i`` seeded with ``(seed + offsets[i]) mod 2**64`` (offsets
    default to ``0 .. batch - 1``)."""
    seed = check_seed(seed)
    offsets = range(batch) if offsets is None else offsets
    if len(offsets) != batch:
        raise JanusError(f"internal: {len(offsets)} seed offsets for {batch} rows")
    gens = []
    for offset in offsets:
        g = torch.Generator(device=device)
        g.manual_seed((seed + offset) % (SEED_MAX + 1))
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
        drop_sorted[..., 0] = False  # and the best one always (a top_p below float32's resolution)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
