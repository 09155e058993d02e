"""The public names of ``janus_core`` stay what they are, whatever submodules were imported before."""

import importlib
import pkgutil

import pytest
import torch

import janus_core
from tests.conftest import PRO_TINY


def test_every_export_is_stable_after_importing_every_submodule():
    first = {name: getattr(janus_core, name) for name in janus_core.__all__}
    for info in pkgutil.walk_packages(janus_core.__path__, prefix="janus_core."):
        if info.name != "janus_core.__main__":
            importlib.import_module(info.name)
    for name in janus_core.__all__:
        again = getattr(janus_core, name)
        assert again is first[name], name
        assert not isinstance(again, type(janus_core)), f"janus_core.{name} is a module, not the API object"
    assert callable(janus_core.understand) and janus_core.understand.__module__ == "janus_core.understanding"


@pytest.mark.parametrize("dtype", ["bf16", torch.int8, 16])
def test_load_model_refuses_a_dtype_that_is_not_a_floating_torch_dtype(dtype):
    with pytest.raises(janus_core.JanusError, match="dtype must be torch.bfloat16, torch.float16 or torch.float32"):
        janus_core.load_model(PRO_TINY, dtype=dtype)
