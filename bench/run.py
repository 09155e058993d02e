"""Janus benchmark: our samplers side by side with restated reference loops, on random-weight models.

    python -m bench.run                          # Janus-Pro-1B shape, auto precision, parallel 1/4/16, all sections
    python -m bench.run --layers 4 --steps 8     # quick run (small models partly fit the CPU cache: optimistic)
    python -m bench.run --model pro-7b --dtypes bf16 --parallel 1 --sections ar,load
    python -m bench.run --dtypes bf16 --parallel 1,4 --sections edit   # editing vs text-to-image per image

``--dtypes``: ``auto`` (what ``load_model`` picks on this machine; the reference runs bf16, as DeepSeek's
scripts do), ``bf16``, ``fp32`` (both sides in that dtype). Prints Markdown tables (this script's report), each
headed by the CPU it was measured on, and logs progress to stderr. See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from janus_core.precision import local_cpu_caps

from .ar import floor_seconds, kv_bytes_per_position, run_ar, weight_bytes_per_step
from .edit import run_edit
from .flow import llm_flops_per_step, run_flow
from .load import FORMATS, measure_load
from .measure import memory_bandwidth, print_table, wait_quiet
from .models import DTYPE_NAMES, ROOT, model_pair, precisions, random_model
from .other import understanding_speed, vq_decode_seconds

logger = logging.getLogger("bench")

SECTIONS = ("ar", "edit", "flow", "vq", "understand", "smoke", "load")
SMOKE = ["-m", "janus_core", "generate", "--model", "tests/fixtures/janus-pro-tiny", "--prompt", "a cat"]
GB = 1e9


def _csv(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",") if v]


def machine_line(threads: int) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{local_cpu_caps().describe()}; {os.cpu_count()} logical CPUs ({threads} threads used), {mem:.0f} GiB "
            f"RAM, {platform.system()} {platform.release()}, torch {torch.__version__}")


def _cpu() -> str:
    """The CPU line every table title carries."""
    return local_cpu_caps().describe()


def _dtype_label(dtype_name: str) -> str:
    ours, ref = precisions(dtype_name)
    return dtype_name if ours == ref else f"{dtype_name} (ours: {ours.describe()}; reference: bf16)"


def bench_ar(args: argparse.Namespace, bandwidth: float) -> None:
    for dtype_name in args.dtypes:
        rows = []
        model, ref_model = model_pair(args.model, dtype_name, args.layers)
        w = weight_bytes_per_step(model)
        wait_quiet()
        bandwidth = max(bandwidth, memory_bandwidth(2.0)["read"])  # a busy neighbour only lowers the probe
        for parallel in args.parallel:
            ours, ref, prompt_len = run_ar(model, ref_model, parallel, args.steps, args.repeats)
            _, floor = floor_seconds(model, parallel, prompt_len, bandwidth)
            kv_gb = kv_bytes_per_position(model) * 2 * parallel * (prompt_len + 576) / GB
            for run in (ours, ref):
                total = run.batch_seconds()
                rows.append([
                    dtype_name, parallel, run.impl, run.early.median * 1e3,
                    run.late.median * 1e3 if run.late else run.early.median * 1e3, run.prefill, total,
                    total / parallel, ref.batch_seconds() / total, total / floor, floor,
                    run.peak_extra / GB, kv_gb, f"{run.early.clean + (run.late.clean if run.late else 0)}/"
                    f"{run.early.total + (run.late.total if run.late else 0)}",
                ])
        del model, ref_model
        print_table(f"AR text-to-image, {args.model}{_layers(args)}, {_dtype_label(dtype_name)}, weights read per "
                    f"step {w / GB:.2f} GB, bandwidth {bandwidth:.1f} GB/s; CPU: {_cpu()}",
                    ["dtype", "parallel", "impl", "ms/step early", "ms/step late", "prefill s", "s/batch",
                     "s/image", "speed-up vs ref", "x floor", "floor s/batch", "peak extra GB", "KV GB (ours)",
                     "clean steps"], rows)


def _layers(args: argparse.Namespace) -> str:
    return "" if args.layers is None else f" cut to {args.layers} layers"


def bench_edit(args: argparse.Namespace) -> None:
    rows = []
    for dtype_name in args.dtypes:
        model = random_model(args.model, precisions(dtype_name)[0], args.layers)
        for parallel in args.parallel:
            plain, edit = run_edit(model, parallel, args.steps, args.repeats)
            for run in (plain, edit):
                rows.append([dtype_name, parallel, run.mode, run.prompt_len, run.prefill / parallel,
                             run.step.median * 1e3 / parallel, run.image_seconds(),
                             run.image_seconds() / plain.image_seconds(), run.peak_extra / GB,
                             f"{run.step.clean}/{run.step.total}"])
        del model
    print_table(f"Instruction editing vs text-to-image, {args.model}{_layers(args)}, per image", [
        "dtype", "parallel", "mode", "prompt positions", "prefill s/image", "ms/step/image", "s/image (576 steps)",
        "x text-to-image", "peak extra GB", "clean steps"], rows)


def bench_flow(args: argparse.Namespace) -> None:
    rows = []
    labels = []
    for dtype_name in args.dtypes:
        model, ref_model = model_pair("flow-1.3b", dtype_name, args.layers)
        labels.append(_dtype_label(dtype_name))
        for parallel in args.flow_parallel:
            ours, ref, prompt_len = run_flow(model, ref_model, parallel, args.flow_steps, args.repeats)
            for run in (ours, ref):
                flops = llm_flops_per_step(model, parallel, prompt_len, run.impl == "reference")
                rows.append([dtype_name, parallel, run.impl, run.step.median, run.image_seconds(),
                             run.image_seconds() / parallel, ref.image_seconds() / run.image_seconds(),
                             flops / run.step.median / 1e12, run.peak_extra / GB,
                             f"{run.step.clean}/{run.step.total}"])
        del model, ref_model
    print_table(f"JanusFlow-1.3B{_layers(args)}, 30 ODE steps, cfg 2; {'; '.join(labels)}; CPU: {_cpu()}", [
        "dtype", "parallel", "impl", "s/step", "s/batch", "s/image", "speed-up vs ref", "LLM TFLOP/s",
        "peak extra GB", "clean steps"], rows)


def bench_vq_understand(args: argparse.Namespace) -> None:
    rows = []
    for dtype_name in args.dtypes:
        model, _ = model_pair(args.model, dtype_name, args.layers)
        label = f"{dtype_name} ({model.precision.describe()})"
        if "vq" in args.sections:
            t = vq_decode_seconds(model)
            rows.append([label, "VQ decode, 1 image", f"{t.median:.2f} s", f"{t.clean}/{t.total}"])
        if "understand" in args.sections:
            u = understanding_speed(model)
            rows.append([label, "understanding: image + prompt prefill", f"{u.prefill:.2f} s", ""])
            rows.append([label, "understanding: greedy decode",
                         f"{1 / u.token.median:.1f} tokens/s ({u.tokens} tokens)", f"{u.token.clean}/{u.token.total}"])
        del model
    print_table(f"VQ decode and understanding, {args.model}{_layers(args)}; CPU: {_cpu()}",
                ["precision", "what", "time", "clean"], rows)


def bench_smoke(args: argparse.Namespace) -> None:
    """The README's offline smoke run (tiny checkpoint, one image, whole process incl. imports), 3 times."""
    rows = []
    for dtype_name in args.dtypes:
        times = []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as out:
                wait_quiet()
                start = time.perf_counter()
                subprocess.run([sys.executable, *SMOKE, "--dtype", dtype_name, "--out", out], cwd=ROOT, check=True,
                               capture_output=True)
                times.append(time.perf_counter() - start)
        rows.append([dtype_name, " ".join(["python", *SMOKE]), f"{sorted(times)[1]:.1f} s",
                     ", ".join(f"{t:.1f}" for t in times)])
    print_table(f"README smoke run (wall clock, median of 3); CPU: {_cpu()}",
                ["--dtype", "command", "median", "runs s"], rows)


def bench_load(args: argparse.Namespace) -> None:
    rows = []
    for fmt in FORMATS:
        for dtype_name in args.load_dtypes:
            r = measure_load(args.model, args.layers, dtype_name, fmt)
            rows.append([f"bf16 {fmt} -> {dtype_name}", r.weight_bytes / GB, r.import_rss / GB, r.peak_rss / GB,
                         r.ratio, r.touched_rss / GB, r.touched_ratio, r.seconds])
    print_table(f"Checkpoint load in a fresh process, {args.model}{_layers(args)} (random bf16 weights); CPU: {_cpu()}",
                ["load", "weights GB", "RSS after imports GB", "peak RSS GB", "peak extra / weights",
                 "peak after reading every weight GB", "that extra / weights", "load s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("pro-1b", "pro-7b"), default="pro-1b")
    parser.add_argument("--layers", type=int, default=None, help="cut the LLM to N layers (quick runs)")
    parser.add_argument("--dtypes", type=lambda s: _csv(str, s), default=["auto"],
                        help=f"comma-separated, of {DTYPE_NAMES}")
    parser.add_argument("--parallel", type=lambda s: _csv(int, s), default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=12, help="AR steps per timed window (>= 576: whole image)")
    parser.add_argument("--flow-steps", type=int, default=3, help="timed JanusFlow steps per run")
    parser.add_argument("--flow-parallel", type=lambda s: _csv(int, s), default=[1])
    parser.add_argument("--load-dtypes", type=lambda s: _csv(str, s), default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (medians pooled)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sections", type=lambda s: _csv(str, s), default=list(SECTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if set(args.dtypes) - set(DTYPE_NAMES):
        parser.error(f"unknown dtypes {sorted(set(args.dtypes) - set(DTYPE_NAMES))}; choose from {DTYPE_NAMES}")
    torch.set_num_threads(args.threads)
    start = time.time()
    print(f"# Janus benchmark\n\nMachine: {machine_line(args.threads)}. Load average at start: "
          f"{os.getloadavg()[0]:.2f}.")
    wait_quiet()
    bw = memory_bandwidth(2.0)
    print_table("Memory bandwidth (2 GiB buffers, GB/s)", list(bw), [[round(v, 1) for v in bw.values()]])
    if "ar" in args.sections:
        bench_ar(args, bw["read"])
    if "edit" in args.sections:
        bench_edit(args)
    if "flow" in args.sections:
        bench_flow(args)
    if "vq" in args.sections or "understand" in args.sections:
        bench_vq_understand(args)
    if "smoke" in args.sections:
        bench_smoke(args)
    if "load" in args.sections:
        bench_load(args)
    print(f"\nTotal bench time {time.time() - start:.0f} s; load average at end {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
