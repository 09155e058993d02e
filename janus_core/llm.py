"""Forward pass of the Llama language model with a preallocated KV cache.

The weights live in transformers' ``LlamaForCausalLM`` (so the state-dict keys are the original ones);
the forward pass is ours. That keeps the hot loops independent of transformers' cache API (which changed
several times since the checkpoints were released) and lets the KV cache be written in place instead of
growing by concatenation. Numerics follow transformers' Llama: RMSNorm in float32, rotate-half RoPE with
float32 angles, SiLU-gated MLP, softmax attention with scale ``head_dim**-0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaSpec


@dataclass
class KVCache:
    """Per-layer keys and values, preallocated: ``keys[i]`` / ``values[i]`` are ``[B, kv_heads, max_len, head_dim]``.

    ``length`` is the number of positions written so far; ``valid`` (optional, bool ``[B, max_len]``)
    marks positions that may be attended (False for left padding or a masked-out prompt part).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    valid: torch.Tensor | None = None

    @classmethod
    def allocate(cls, runner: LlamaRunner, batch: int, max_len: int, *, with_mask: bool = False) -> KVCache:
        """Empty cache for ``runner``'s model with room for ``max_len`` positions of ``batch`` rows."""
        ref = runner.lm.model.embed_tokens.weight
        shape = (batch, runner.n_kv, max_len, runner.head_dim)
        n = runner.n_layers
        keys = [torch.empty(shape, dtype=ref.dtype, device=ref.device) for _ in range(n)]
        values = [torch.empty(shape, dtype=ref.dtype, device=ref.device) for _ in range(n)]
        valid = torch.zeros(batch, max_len, dtype=torch.bool, device=ref.device) if with_mask else None
        return cls(keys, values, 0, valid)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def copy_prefix_into(self, other: KVCache, rows: slice | torch.Tensor,
                         source_rows: slice | torch.Tensor | None = None) -> None:
        """Copy this cache's ``length`` positions (rows ``source_rows``, default all) into ``other[rows]``.

        Used to prefill a shared prompt once and hand it to every row of a larger batch.
        """
        n = self.length
        src_rows = slice(None) if source_rows is None else source_rows
        for src, dst in zip(self.keys + self.values, other.keys + other.values, strict=True):
            dst[rows, :, :n] = src[src_rows, :, :n]
        if other.valid is not None:
            other.valid[rows, :n] = True if self.valid is None else self.valid[src_rows, :n]
        other.length = max(other.length, n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RotaryTable:
    """cos/sin tables ``[max_pos, head_dim]`` (float32 angles, stored in the model dtype)."""

    def __init__(self, head_dim: int, theta: float, max_pos: int, dtype: torch.dtype, device: torch.device):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        pos = torch.arange(max_pos, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` or ``[B, T]`` -> cos, sin broadcastable to ``[B, heads, T, head_dim]``."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaRunner:
    """Runs a transformers ``LlamaForCausalLM``'s decoder stack over a :class:`KVCache`.

    ``forward(embeds, cache)`` appends ``T`` positions and returns the final-norm hidden states
    ``[B, T, hidden]``; logits (when wanted) come from :meth:`lm_logits`.
    """

    def __init__(self, lm: nn.Module, spec: LlamaSpec):
        self.lm = lm
        self.n_layers = spec.num_hidden_layers
        self.n_heads = spec.num_attention_heads
        self.n_kv = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.eps = spec.rms_norm_eps
        self.theta = spec.rope_theta
        self._rope: RotaryTable | None = None
        self._rope_key: tuple | None = None

    def rope(self, max_pos: int) -> RotaryTable:
        w = self.lm.model.embed_tokens.weight
        key = (w.dtype, w.device)
        if self._rope is None or self._rope_key != key or self._rope.cos.shape[0] < max_pos:
            size = max(max_pos, 4096)
            self._rope = RotaryTable(self.head_dim, self.theta, size, w.dtype, w.device)
            self._rope_key = key
        return self._rope

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token ids ``[B, T]`` -> embeddings ``[B, T, hidden]``."""
        return self.lm.model.embed_tokens(ids)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden ``[..., hidden]`` -> text logits ``[..., vocab]``."""
        return self.lm.lm_head(hidden)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
                new_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``embeds [B, T, hidden]`` to ``cache`` and return final-norm hidden ``[B, T, hidden]``.

        ``positions`` (``[T]`` or ``[B, T]``, default ``cache.length + arange(T)``) are the RoPE positions.
        ``new_valid`` (bool ``[B, T]``) marks which new positions later tokens may attend; it needs a
        cache allocated ``with_mask=True``. Attention is causal within the new block.
        """
        bsz, t, _ = embeds.shape
        start = cache.length
        end = start + t
        if end > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, {end} needed")
        if cache.batch != bsz:
            raise ValueError(f"KV cache batch {cache.batch} != input batch {bsz}")
        device = embeds.device
        if positions is None:
            positions = torch.arange(start, end, device=device)
        cos, sin = self.rope(int(positions.max()) + 1)(positions)
        mask = self._attention_mask(cache, start, end, t, new_valid, device)
        x = embeds
        for i, layer in enumerate(self.lm.model.layers):
            attn = layer.self_attn
            h = rms_norm(x, layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(h).view(bsz, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(bsz, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(bsz, t, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.keys[i][:, :, start:end] = k
            cache.values[i][:, :, start:end] = v
            keys = cache.keys[i][:, :, :end]
            values = cache.values[i][:, :, :end]
            if self.n_kv != self.n_heads:
                rep = self.n_heads // self.n_kv
                keys = keys.repeat_interleave(rep, dim=1)
                values = values.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and t > 1
                                               and start == 0)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(bsz, t, -1))
            h = rms_norm(x, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        cache.length = end
        return rms_norm(x, self.lm.model.norm.weight, self.eps)

    @staticmethod
    def _attention_mask(cache: KVCache, start: int, end: int, t: int, new_valid: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
        """Boolean ``[B or 1, 1, T, end]`` mask (True = attend), or None when plain causal/full suffices."""
        if cache.valid is None:
            if new_valid is not None:
                raise ValueError("new_valid needs a cache allocated with_mask=True")
            if t == 1 or start == 0:
                return None
            causal = torch.ones(t, end, dtype=torch.bool, device=device).tril(start)
            return causal[None, None]
        if new_valid is None:
            cache.valid[:, start:end] = True
        else:
            cache.valid[:, start:end] = new_valid
        keys_ok = cache.valid[:, :end][:, None, None, :]  # [B,1,1,end]
        causal = torch.ones(t, end, dtype=torch.bool, device=device).tril(start)[None, None]
        mask = keys_ok & causal
        # A query whose every key is masked (a left-pad position) would give NaN; let it see itself.
        diag = torch.zeros(t, end, dtype=torch.bool, device=device)
        diag[torch.arange(t), torch.arange(start, end)] = True
        return mask | diag[None, None]
