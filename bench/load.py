"""Checkpoint-load peak RAM: write a random bf16 checkpoint of a release shape, load it in a fresh process.

Both on-disk formats of the releases are measured: ``model.safetensors`` (Janus-1.3B, JanusFlow) and
``pytorch_model.bin`` (Janus-Pro).

``python -m bench.load FOLDER [--dtype bf16]`` is the probe run in the child: it imports everything, notes
its RSS, loads with ``janus_core.load_model`` and prints one JSON line. Peaks are the kernel's ``VmHWM``
(high-water RSS of this process image; ``getrusage`` would also count the parent's RSS from before exec).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import ROOT, build_meta_net, fixture_folder, random_tensors, release_config, release_config_dict

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
              "processor_config.json")
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], source) -> int:
    """Stream a safetensors file: header from ``tensors`` (name -> shape, dtype), data from ``source``
    (an iterator of ``(name, tensor)`` in the same order). Returns the data bytes written."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        size = dtype.itemsize
        for d in shape:
            size *= d
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for (name, tensor), expected in zip(source, tensors, strict=True):
            if name != expected:
                raise ValueError(f"tensor order differs: {name} vs {expected}")
            fh.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return offset


FORMATS = ("safetensors", "bin")


def write_random_checkpoint(name: str, layers: int | None, folder: Path, dtype: torch.dtype = torch.bfloat16,
                            fmt: str = "safetensors") -> int:
    """A loadable checkpoint folder of ``name``'s shape with random ``dtype`` weights; returns weight bytes.

    ``fmt`` ``"safetensors"`` writes ``model.safetensors`` (streamed); ``"bin"`` writes ``pytorch_model.bin``
    with ``torch.save`` (the whole state dict is built in memory first).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(release_config_dict(name, layers), indent=1), encoding="utf-8")
    for side in SIDE_FILES:
        if (fixture_folder(name) / side).is_file():
            shutil.copy(fixture_folder(name) / side, folder / side)
    net = build_meta_net(release_config(name, layers))
    if fmt == "bin":
        state = dict(random_tensors(net, dtype))
        torch.save(state, folder / "pytorch_model.bin")
        return sum(t.numel() * t.element_size() for t in state.values())
    shapes = {k: (tuple(v.shape), dtype if v.is_floating_point() else v.dtype) for k, v in net.state_dict().items()}
    return write_safetensors(folder / "model.safetensors", shapes, random_tensors(net, dtype))


@dataclass(frozen=True)
class LoadResult:
    weight_bytes: int  # parameter bytes of the loaded model
    file_bytes: int
    import_rss: int  # child RSS after imports, before loading
    peak_rss: int  # child peak RSS during the load
    touched_rss: int  # child peak RSS after reading every weight once (would grow if pages were loaded lazily)
    seconds: float

    @property
    def ratio(self) -> float:
        """Peak RAM the load added, relative to the weight bytes."""
        return (self.peak_rss - self.import_rss) / self.weight_bytes

    @property
    def touched_ratio(self) -> float:
        """Peak RAM added by the load and a first read of every weight, relative to the weight bytes."""
        return (self.touched_rss - self.import_rss) / self.weight_bytes


def measure_load(name: str, layers: int | None, dtype: str = "bf16", fmt: str = "safetensors") -> LoadResult:
    """Write a random bf16 checkpoint (``fmt``) to a temp folder and load it as ``dtype`` in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="janus-bench-") as tmp:
        folder = Path(tmp) / "model"
        file_bytes = write_random_checkpoint(name, layers, folder, fmt=fmt)
        out = subprocess.run([sys.executable, "-m", "bench.load", str(folder), "--dtype", dtype], cwd=ROOT,
                             check=True, capture_output=True, text=True)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
    return LoadResult(probe["weight_bytes"], file_bytes, probe["import_rss"], probe["peak_rss"], probe["touched_rss"],
                      probe["seconds"])


def _high_water_rss() -> int:
    """Peak resident set size of this process (``VmHWM``), bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _probe(folder: Path, dtype: torch.dtype) -> dict:
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the baseline RSS

    from janus_core.model import load_model, param_bytes

    from .measure import rss_bytes

    import_rss = rss_bytes()
    start = time.perf_counter()
    model = load_model(folder, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - start
    peak = _high_water_rss()
    with torch.inference_mode():
        for p in model.net.parameters():
            p.sum()
    touched = _high_water_rss()
    return {"weight_bytes": param_bytes(model), "import_rss": import_rss, "peak_rss": peak, "touched_rss": touched,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    print(json.dumps(_probe(args.folder, DTYPES[args.dtype])))


if __name__ == "__main__":
    main()
