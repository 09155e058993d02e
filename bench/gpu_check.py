"""GPU readiness in one command: ``python -m bench.gpu_check`` (under 10 minutes on a CUDA machine).

1. Parity: every dtype the GPU runs (float16, bfloat16 where supported, float32) against the goldens of
   DeepSeek's code on the tiny fixtures, with the test-suite's tolerances: AR teacher-forced gen-head logits,
   the VQ decode and JanusFlow's velocities.
2. The compiled decode step (``torch.compile``, CUDA graphs on CUDA) against the eager one: the same logits on
   the tiny fixture, and ms per step of each on the real shapes.
3. Weight-only int8 / int4: which kernel passed its load-time self-check on the device (or why the
   dequantize-then-matmul fallback serves), and the quantized tiny model's AR logits against the golden.
4. AR at parallel 1 and 16 against the restated reference loop (bench/reference.py) on the real Janus-Pro-1B
   shapes with random weights, in the automatic precision.

Prints one table; exits 1 when a check fails. Without CUDA it is a dry run on the CPU with the tiny fixtures'
shapes (seconds, so CI keeps it working) and says that it measured no GPU. TF32 is switched off for the
float32 parity checks (it would exceed their tolerance) and restored for the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import janus_core
from janus_core.generate_ar import PromptTokens, build_cfg_pair, cfg_logit_steps
from janus_core.generate_flow import build_flow_cfg, iter_flow_steps
from janus_core.model import JanusModel
from janus_core.precision import Precision
from janus_core.quant.kernels import kernel_for

from . import measure
from .ar import run_ar, time_sampler
from .measure import print_table
from .models import FIXTURES, model_pair

logger = logging.getLogger("bench.gpu_check")

PRO_TINY, FLOW_TINY = FIXTURES / "janus-pro-tiny", FIXTURES / "janusflow-tiny"
FLOW_GOLDEN_STEPS, FLOW_CHECKED_STEPS, CFG_FLOW = 5, 2, 2.0
# Largest |actual - golden| / max |golden| allowed, by the dtype a result is computed in: float32 as the parity
# tests (tests/test_generate_ar.py, test_generate_flow.py), float16 / bfloat16 logits as
# tests/test_checkpoint.py / tests/test_llm_fast_paths.py; images and velocities, which pass through every
# layer of a convolution stack in half precision, as tests/test_precision.py.
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
DEEP_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}
COMPILED_TOLERANCE = 1e-4  # tests/test_compiled_decode.py (float32)
# Quantized tiny model, AR logits as LOGITS_TOLERANCE measures them: ~1.5x what the CPU gives (int8 0.033-0.037,
# int4 0.39 in fp32 / bf16: hidden size 64 makes int4 coarse). A broken kernel is off by ~1.
QUANTIZED_LOGITS_TOLERANCE = {"int8": 0.06, "int4": 0.6}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Row:
    """One line of the report; ``ok`` is None for measurements without a pass / fail limit."""

    check: str
    setting: str
    measured: str
    limit: str
    ok: bool | None

    def cells(self) -> list[str]:
        return [self.check, self.setting, self.measured, self.limit,
                "-" if self.ok is None else ("pass" if self.ok else "FAIL")]


def _golden(folder, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "golden" / f"{name}.safetensors"))


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (both on the CPU in float32)."""
    expected = expected.float().cpu()
    return ((actual.float().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _ar_logits_error(model: JanusModel) -> float:
    """Teacher-forced gen-head logits (cond and uncond rows, every step) against the golden."""
    g = _golden(PRO_TINY, "ar_teacher_forced")
    prompt = PromptTokens("", "", g["input_ids"], model.variant, str(model.folder))
    steps = cfg_logit_steps(model, build_cfg_pair(model, prompt, batch_size=2))
    _, out = next(steps)
    worst = 0.0
    forced = g["forced_tokens"].to(model.device)
    for s in range(forced.shape[1]):
        worst = max(worst, _error(out[:2], g["cond_logits"][s]), _error(out[2:], g["uncond_logits"][s]))
        _, out = steps.send(forced[:, s])
    steps.close()
    return worst


def _vq_error(model: JanusModel) -> float:
    g = _golden(PRO_TINY, "vq_decode")
    vq = model.net.gen_vision_model
    with torch.inference_mode():
        return _error(vq.decode_code(g["codes"].to(model.device), (24, 24)), g["decoded"])


def _flow_error(model: JanusModel) -> float:
    """Velocities of the first :data:`FLOW_CHECKED_STEPS` ODE steps against the golden."""
    flow = _golden(FLOW_TINY, "flow")
    prompts = json.loads((FLOW_TINY / "golden" / "prompts.json").read_text(encoding="utf-8"))["prompts"]
    pair = build_flow_cfg(model, prompts[0]["prompt"], batch_size=2)
    worst = 0.0
    for st in iter_flow_steps(model, pair, flow["z0"], FLOW_GOLDEN_STEPS, CFG_FLOW):
        worst = max(worst, _error(st.velocity, flow["velocity"][st.step]))
        if st.step + 1 >= FLOW_CHECKED_STEPS:
            break
    return worst


def parity_rows(device: torch.device, dtypes: list[torch.dtype]) -> list[Row]:
    """Each dtype against the goldens (tiny fixtures)."""
    rows = []
    with _no_tf32():
        for dtype in dtypes:
            name = DTYPE_NAMES[dtype]
            pro = janus_core.load_model(PRO_TINY, device=device, dtype=dtype)
            flow = janus_core.load_model(FLOW_TINY, device=device, dtype=dtype)
            # (check, error, the components on the result's path, tolerance table)
            for check, error, path, table in (
                ("AR teacher-forced logits vs golden", _ar_logits_error(pro), ("llm", "gen_head"), LOGITS_TOLERANCE),
                ("VQ decode vs golden", _vq_error(pro), ("vq",), DEEP_TOLERANCE),
                ("JanusFlow velocities vs golden", _flow_error(flow), ("llm", "flow"), DEEP_TOLERANCE),
            ):
                precision = flow.precision if "velocities" in check else pro.precision
                limit = max(table[precision.of(c)] for c in path)
                where = ", ".join(f"{c} {DTYPE_NAMES[precision.of(c)]}" for c in path)
                rows.append(Row(check, f"{name} ({where})", f"{error:.2e}", f"<= {limit:.0e}", error <= limit))
            del pro, flow
    return rows


def quantized_rows(device: torch.device) -> list[Row]:
    """Per mode: the kernel chosen for the device (self-checked at load) and the quantized tiny model's logits."""
    rows = []
    for mode, limit in QUANTIZED_LOGITS_TOLERANCE.items():
        model = janus_core.load_model(PRO_TINY, device=device, quantize=mode)
        compute = DTYPE_NAMES[model.dtype]
        choice = kernel_for(model.device, mode, model.dtype)
        rows.append(Row(f"{mode} matmul", f"{compute} on {device.type}", choice.reason, "", None))
        error = _ar_logits_error(model)
        rows.append(Row("AR teacher-forced logits vs golden", f"{mode} ({compute} compute)", f"{error:.2e}",
                        f"<= {limit:.0e}", error <= limit))
    return rows


def _trace(model: JanusModel, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    steps = cfg_logit_steps(model, build_cfg_pair(model, "A red cube on a wooden table.", batch_size=2))
    out = [tuple(t.clone() for t in next(steps))]
    for chosen in tokens:
        out.append(tuple(t.clone() for t in steps.send(chosen.to(model.device))))
    steps.close()
    return out


def compiled_parity_row(device: torch.device) -> Row:
    """Compiled decode steps give the eager hidden states and logits (tiny fixture, float32)."""
    with _no_tf32():
        model = janus_core.load_model(PRO_TINY, device=device, dtype=torch.float32)
        tokens = torch.randint(0, model.config.vq.codebook_size, (4, 2), generator=torch.Generator().manual_seed(0))
        eager = _trace(model, tokens)
        model.llm.compile = True
        compiled = _trace(model, tokens)
    if not model.llm.compile:
        return Row("compiled decode step vs eager", "fp32, tiny", "compiling failed (see the log)", "", False)
    error = max(max(_error(hc, he), _error(lc, le)) for (he, le), (hc, lc) in zip(eager, compiled, strict=True))
    return Row("compiled decode step vs eager", "fp32, tiny fixture, 4 steps", f"{error:.2e}",
               f"<= {COMPILED_TOLERANCE:.0e}", error <= COMPILED_TOLERANCE)


def compiled_timing_row(model: JanusModel, steps: int, label: str) -> Row:
    """ms per AR step at parallel 1, eager and compiled (the first compiled run compiles and is not timed)."""
    pair = build_cfg_pair(model, "A red cube on a wooden table.", batch_size=1)
    times = {}
    for compiled in (False, True):
        model.llm.compile = compiled
        time_sampler(model, pair, 3)  # warm-up: allocator, compilation, CUDA-graph recording
        times[compiled] = statistics.median(wall for wall, _ in time_sampler(model, pair, steps + 1)[1].steps())
    fell_back = not model.llm.compile
    model.llm.compile = False
    measured = f"eager {times[False] * 1e3:.1f} ms, compiled {times[True] * 1e3:.1f} ms"
    if fell_back:
        measured += " (compiling failed: eager both times)"
    return Row("decode step, compiled vs eager", f"{label}, parallel 1", measured, "", None)


def ar_rows(model: JanusModel, ref_model: JanusModel, steps: int, label: str) -> list[Row]:
    """Our sampler against the restated reference loop at parallel 1 and 16."""
    rows = []
    for parallel in (1, 16):
        ours, ref, _ = run_ar(model, ref_model, parallel, steps, 1)
        speedup = ref.batch_seconds() / ours.batch_seconds()
        rows.append(Row("AR vs reference loop", f"{label}, parallel {parallel}",
                        f"{ours.batch_seconds() / parallel:.3g} vs {ref.batch_seconds() / parallel:.3g} s/image "
                        f"({speedup:.2f}x)", "", None))
    return rows


def _tiny_pair(device: torch.device) -> tuple[JanusModel, JanusModel]:
    """The tiny fixture in the automatic precision, and in the reference's bf16 (shared if equal)."""
    ours = janus_core.load_model(PRO_TINY, device=device)
    reference = Precision.uniform(torch.bfloat16)
    if ours.precision == reference:
        return ours, ours
    return ours, janus_core.load_model(PRO_TINY, device=device, dtype=torch.bfloat16)


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"GPU: {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}")
    return ("DRY RUN ON THE CPU: no GPU was measured (torch.cuda.is_available() is False); tiny fixture shapes, "
            f"so the timings say nothing about a GPU. torch {torch.__version__}")


def run(device: torch.device, model_name: str, layers: int | None, steps: int) -> list[Row]:
    """Every check on ``device`` (a dry run on the CPU); returns the report rows."""
    gpu = device.type == "cuda"
    halves = [torch.float16] + ([torch.bfloat16] if not gpu or torch.cuda.is_bf16_supported() else [])
    rows = parity_rows(device, [torch.float32, *halves])
    rows.append(compiled_parity_row(device))
    rows.extend(quantized_rows(device))
    if gpu:
        model, ref_model = model_pair(model_name, "auto", layers, str(device))
        label = f"{model_name}{'' if layers is None else f' ({layers} layers)'}, random weights"
    else:
        model, ref_model = _tiny_pair(device)
        label = "tiny fixture"
    label += f", ours {model.precision.summary()}, reference {DTYPE_NAMES[ref_model.dtype]}"
    rows.append(compiled_timing_row(model, steps, label))
    rows.extend(ar_rows(model, ref_model, steps, label))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("pro-1b", "pro-7b"), default="pro-1b")
    parser.add_argument("--layers", type=int, default=None, help="cut the LLM to N layers")
    parser.add_argument("--steps", type=int, default=None, help="timed AR steps per window (GPU 32, dry run 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu"):
        parser.error("--device must be cuda or cpu")
    measure.QUIET_TIMEOUT = 0.0  # CPU neighbours do not slow a GPU down; dry-run timings mean nothing anyway
    header = device_line(device)
    print(f"# Janus GPU check\n\n{header}")
    rows = run(device, args.model, args.layers, args.steps or (32 if device.type == "cuda" else 4))
    print_table("GPU readiness" if device.type == "cuda" else "GPU readiness: DRY RUN, NO GPU MEASURED",
                ["check", "setting", "measured", "limit", "result"], [r.cells() for r in rows])
    failed = [r for r in rows if r.ok is False]
    print(f"\n{len(failed)} check(s) failed." if failed else "\nAll checks passed.")
    if device.type != "cuda":
        print("No GPU was measured: this was a dry run on the CPU.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
