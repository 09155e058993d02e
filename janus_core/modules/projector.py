"""Small MLP heads of Janus: the ``mlp_gelu`` aligners and the image-token generation head (spec §2.3, §2.5)."""

from __future__ import annotations

import torch
from torch import nn

from janus_core.errors import JanusError
from janus_core.llm import linear


class MlpProjector(nn.Module):
    """``mlp_gelu`` projector: Linear(input_dim, n_embed) followed by (depth-1) x [GELU, Linear(n_embed, n_embed)].

    Keys ``layers.0.*``, ``layers.2.*``, ... (odd indices are the parameter-free GELUs).
    """

    def __init__(self, input_dim: int, n_embed: int, depth: int = 2) -> None:
        super().__init__()
        if depth < 1:
            raise JanusError(f"MlpProjector depth must be >= 1, got {depth}; fix the aligner config.")
        mods: list[nn.Module] = [nn.Linear(input_dim, n_embed)]
        for _ in range(depth - 1):
            mods.append(nn.GELU())
            mods.append(nn.Linear(n_embed, n_embed))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[.., input_dim] -> [.., n_embed]."""
        return self.layers(x)


class GenHead(nn.Module):
    """Image-token head: Linear(n_embed, image_token_embed) -> exact GELU -> Linear(.., image_token_size).

    Keys ``output_mlp_projector.*`` and ``vision_head.*``.
    """

    def __init__(self, n_embed: int, image_token_embed: int, image_token_size: int) -> None:
        super().__init__()
        self.output_mlp_projector = nn.Linear(n_embed, image_token_embed)
        self.vision_activation = nn.GELU()
        self.vision_head = nn.Linear(image_token_embed, image_token_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [.., n_embed] -> logits [.., image_token_size] (computed in the head's own dtype).

        Its matmuls are the LLM's (:func:`janus_core.llm.linear`): the head is read once per decode step too.
        """
        first, second = self.output_mlp_projector, self.vision_head
        h = linear(hidden.to(first.weight.dtype), first.weight).add_(first.bias)
        return linear(self.vision_activation(h), second.weight).add_(second.bias)
