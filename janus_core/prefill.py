"""Prompt rows for the language model: left padding, RoPE positions, and the prefill that runs each distinct row
once and hands its keys and values to every image.

Used by every path that starts from a prompt: AR generation and editing (2 or 3 guidance rows shared by the
batch), JanusFlow (the prompt rows shared by the batch) and understanding (one row per prompt).

Rows of different lengths share one batch by left padding: padded positions are marked invalid, so attention
masks them out, and :func:`positions_of` counts RoPE positions from each row's first valid token, so every row
computes what it computes alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .llm import KVCache, LlamaRunner


def left_pad(rows: Sequence[torch.Tensor], fill: float | int | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[L_i, ...]`` (token ids, flags or embeddings; one dtype and device) -> ``(padded [R, L, ...],
    valid [R, L])``: each row right-aligned in ``L = max(L_i)`` positions, ``fill`` before it, ``valid`` True
    on the row's own positions."""
    length = max(r.shape[0] for r in rows)
    first = rows[0]
    padded = torch.full((len(rows), length, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
    valid = torch.zeros(len(rows), length, dtype=torch.bool, device=first.device)
    for i, r in enumerate(rows):
        padded[i, length - r.shape[0]:] = r
        valid[i, length - r.shape[0]:] = True
    return padded, valid


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``[R, L]`` of left-padded rows: 0 at each row's first valid position (padding gets 0)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def prefill_rows(runner: LlamaRunner, embeds: torch.Tensor, capacity: int, copies: int = 1,
                 valid: torch.Tensor | None = None, positions: torch.Tensor | None = None
                 ) -> tuple[KVCache, torch.Tensor]:
    """Run the ``R`` distinct prompt rows ``embeds [R, L, hidden]`` once and return a cache of ``R * copies``
    rows with room for ``capacity`` positions holding them, and the rows' final-norm hidden states ``[R, L, hidden]``.

    Row ``r`` of the prompt fills cache rows ``[r * copies, (r + 1) * copies)`` (kind-major: all images' cond rows,
    then all uncond rows, ...). ``valid [R, L]`` (bool) marks the positions later tokens may attend (the cache then
    carries a mask); ``positions`` are the RoPE positions (``[L]`` or ``[R, L]``, default ``0..L-1``). With one
    copy the prompt is written straight into the returned cache; otherwise it runs in a cache of its own length
    and is copied to every image's rows.
    """
    rows, length = embeds.shape[:2]
    masked = valid is not None
    if copies == 1:
        cache = KVCache.allocate(runner, rows, capacity, with_mask=masked)
        return cache, runner.forward(embeds, cache, positions, new_valid=valid)
    prompt = KVCache.allocate(runner, rows, length, with_mask=masked)
    hidden = runner.forward(embeds, prompt, positions, new_valid=valid)
    cache = KVCache.allocate(runner, rows * copies, capacity, with_mask=masked)
    prompt.copy_prefix_into(cache, slice(None), torch.arange(rows, device=embeds.device).repeat_interleave(copies))
    return cache, hidden
