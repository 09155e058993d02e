"""``pip install .`` and ``pip install -e .`` put ``janus_core`` (and nothing else of the pack) on the path.

Each case builds a throwaway venv whose only link to this environment is a ``.pth`` line naming this
environment's site-packages, so torch, transformers, pip and setuptools come from here (offline, no download)
while ``janus_core`` must come from the install. pip builds in the source tree (``build/``, ``*.egg-info``), so
it installs a copy of the repository.
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import IMAGE_PATH, PRO_TINY

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _throwaway_venv(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "outer_env.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    return python


@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_pip_install_puts_janus_core_on_the_path(tmp_path, editable):
    source = tmp_path / "ComfyUI-Janus"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "fixtures", "build", "*.egg-info", "outputs"))
    python = _throwaway_venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          *(["-e"] if editable else []), source], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _run([python, "-c", "import importlib.util as u, janus_core; print(janus_core.__file__); "
                  "print([n for n in ('nodes', 'tests', 'bench') if u.find_spec(n)]); "
                  "from janus_core.quant import built_kernels as b; from pathlib import Path; "
                  "print(all(Path(b.__file__).with_name(v.source).is_file() for v in b.BUILDS.values()))"],
                 elsewhere).split("\n")
    expected_home = source if editable else tmp_path / "venv"
    assert Path(found[0]).is_relative_to(expected_home), found[0]
    assert found[1] == "[]", "only janus_core is installed, not the ComfyUI glue, tests or benchmarks"
    assert found[2] == "True", "the built kernels' C sources are installed with the package"
    answer = _run([python, "-m", "janus_core", "understand", "--model", PRO_TINY, "--image", IMAGE_PATH,
                   "--max-new-tokens", "2", "--dtype", "fp32", "--device", "cpu"], elsewhere)
    assert answer.strip()
