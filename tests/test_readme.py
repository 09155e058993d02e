"""The README's commands and Python example stay true.

The Python example under "## Python API" runs as written, with one documented change: the three quoted names
below (two release folders under models/Janus and the SDXL VAE repo id) become the tiny checkpoints in
tests/fixtures, so it runs offline in seconds. Each name must occur exactly once, so the example cannot drift
away from what is run here.
"""

import re
from pathlib import Path

import torch

from tests.conftest import FLOW_TINY, PRO_TINY

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

SUBSTITUTIONS = {
    '"models/Janus/Janus-Pro-1B"': repr(str(PRO_TINY)),
    '"models/Janus/JanusFlow-1.3B"': repr(str(FLOW_TINY)),
    '"stabilityai/sdxl-vae"': repr(str(FLOW_TINY / "vae")),
}


def _python_example() -> str:
    section = README[README.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_on_the_tiny_checkpoints(tmp_path, monkeypatch):
    code = _python_example()
    for name, tiny in SUBSTITUTIONS.items():
        assert code.count(name) == 1, f"the README example should name {name} exactly once"
        code = code.replace(name, tiny)
    monkeypatch.chdir(tmp_path)  # the example writes cube.png into the current folder
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)

    assert scope["tokens"].shape == (4, 576) and scope["tokens"].dtype == torch.long
    assert scope["images"].shape == (4, 384, 384, 3) and 0 <= scope["images"].min() <= scope["images"].max() <= 1
    assert (tmp_path / "cube.png").is_file()
    answers = scope["answers"]
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
    assert scope["z"].shape == (2, 4, 48, 48)
    assert scope["sunsets"].shape == (2, 384, 384, 3)


def test_readme_installs_the_torch_minor_that_ci_tests():
    ci = re.findall(r"torch==(\d+\.\d+)\.\d+", (ROOT / ".ci" / "run").read_text())
    readme = re.findall(r'pip install "torch==(\d+\.\d+)\.\*"', README)
    assert len(ci) == 1 and len(readme) == 2 and set(readme) == set(ci), (ci, readme)
