"""Random-weight Janus models of the real release shapes, built without any download.

The network sizes come from the release configs kept in ``tests/fixtures/configs`` (``--layers`` shortens the
LLM for quick runs); the tokenizer and image preprocessor are the tiny fixtures' (vocabulary 527, enough for
prompt ids). Weights are drawn from a seeded normal (std 0.02; norm scales 1, biases 0) directly in the
requested dtype, so building never holds a float32 copy of a bf16 model.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from janus_core.config import JanusConfig, parse_config
from janus_core.model import JanusModel, _materialize_rope_buffers, weight_dtype
from janus_core.modules.composite import JanusARNet, JanusFlowNet
from janus_core.precision import Precision, precision_for
from janus_core.processor import ImagePreprocessor, JanusTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = FIXTURES / "configs"

# --model name -> (release config, variant, folder whose tokenizer / preprocessor the bench borrows)
MODELS: dict[str, tuple[str, str, str]] = {
    "pro-1b": ("janus-1.3b.json", "janus-pro", "janus-pro-tiny"),  # Janus-Pro-1B has the Janus-1.3B sizes
    "pro-7b": ("janus-pro-7b.json", "janus-pro", "janus-pro-tiny"),
    "flow-1.3b": ("janusflow-1.3b.json", "janusflow", "janusflow-tiny"),
}

_NORM_SCALE = re.compile(r"norm[^.]*\.weight$")


def release_config_dict(name: str, layers: int | None = None) -> dict:
    """The release ``config.json`` of ``name`` (a :data:`MODELS` key), LLM cut to ``layers`` if given."""
    cfg = json.loads((CONFIGS / MODELS[name][0]).read_text(encoding="utf-8"))
    cfg = copy.deepcopy(cfg)
    if layers is not None:
        cfg["language_config"]["num_hidden_layers"] = int(layers)
    return cfg


def release_config(name: str, layers: int | None = None) -> JanusConfig:
    """Parsed :class:`JanusConfig` of ``name`` (see :func:`release_config_dict`)."""
    return parse_config(release_config_dict(name, layers), variant=MODELS[name][1])


def fixture_folder(name: str) -> Path:
    """The tiny fixture folder that lends ``name`` its tokenizer and preprocessor config."""
    return FIXTURES / MODELS[name][2]


def build_meta_net(config: JanusConfig) -> nn.Module:
    """The composite network of ``config`` on the meta device (no memory)."""
    with torch.device("meta"):
        return JanusFlowNet(config) if config.is_flow else JanusARNet(config)


def random_tensors(net: nn.Module, dtype: torch.dtype | Precision, seed: int = 0
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every entry of ``net``'s state dict: CPU, ``dtype`` (one for all, or each
    component's under a :class:`Precision`), seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    for name, ref in net.state_dict().items():
        target = weight_dtype(name, dtype) if isinstance(dtype, Precision) else dtype
        out = torch.empty(ref.shape, dtype=target if ref.is_floating_point() else ref.dtype)
        if ref.dim() >= 2:
            out.normal_(0.0, 0.02, generator=gen)
        elif _NORM_SCALE.search(name):
            out.fill_(1.0)
        else:
            out.zero_()
        yield name, out


def random_model(name: str, dtype: torch.dtype | Precision, layers: int | None = None, seed: int = 0) -> JanusModel:
    """A :class:`JanusModel` of ``name``'s release shape with random weights on the CPU in ``dtype`` (one
    dtype, or a :class:`Precision`)."""
    config = release_config(name, layers)
    net = build_meta_net(config)
    precision = dtype if isinstance(dtype, Precision) else Precision.uniform(dtype)
    net.load_state_dict(dict(random_tensors(net, precision, seed)), strict=True, assign=True)
    _materialize_rope_buffers(net, config, torch.device("cpu"))
    net.eval().requires_grad_(False)
    folder = fixture_folder(name)
    model = JanusModel(net, config, JanusTokenizer(folder), ImagePreprocessor.from_folder(folder), folder,
                       precision)
    model.pack_projections()  # as load_model does
    return model


# --dtypes name -> (our precision, the reference's): "auto" is what load_model picks on this machine; the
# reference always runs one dtype (DeepSeek's scripts cast the whole model to bf16; fp16 on GPUs without bf16).
DTYPE_NAMES = ("auto", "bf16", "fp32")
_ONE_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def precisions(dtype_name: str, device: str = "cpu") -> tuple[Precision, Precision]:
    """(ours, reference) precision on ``device`` for a ``--dtypes`` entry (see :data:`DTYPE_NAMES`)."""
    if dtype_name == "auto":
        no_bf16_gpu = torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported()
        return precision_for(device), Precision.uniform(torch.float16 if no_bf16_gpu else torch.bfloat16)
    one = Precision.uniform(_ONE_DTYPE[dtype_name])
    return one, one


def model_pair(name: str, dtype_name: str, layers: int | None = None, device: str = "cpu"
               ) -> tuple[JanusModel, JanusModel]:
    """(ours, reference) random models of ``name`` for ``dtype_name`` on ``device``; one shared model when the
    precisions agree."""
    ours, ref = precisions(dtype_name, device)
    model = random_model(name, ours, layers).to(device)
    return model, (model if ref == ours else random_model(name, ref, layers).to(device))
