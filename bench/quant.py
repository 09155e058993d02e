"""Weight-only int8 / int4 against bf16, side by side in one run: memory, AR speed, quality (random weights).

    python -m bench.quant                                        # everything (7B memory needs ~15 GB in /tmp)
    python -m bench.quant --sections speed --layers 4 --steps 16  # AR speed, Janus-Pro-1B width cut to 4 layers
    python -m bench.quant --sections memory --memory-model pro-7b
    python -m bench.quant --sections quality --quality-layers 24

* memory: a random bf16 checkpoint of the release shape is written to ``--tmp`` (safetensors; ``--bin`` also
  as ``pytorch_model.bin``) and loaded in a fresh process per precision: RSS after the imports, peak RSS of
  the load (``VmHWM``), RSS once loaded and after one AR step, and the weight bytes (what a GPU holds; the
  same as computed from the shapes, which is also printed for the releases).
* kernels: one decoder layer's matmuls at a few row counts, bf16 in both operand orders against int8 / int4,
  with their multiply-add rates (GFLOP/s) and, for scale, the rate of large bf16 / float32 matmuls.
* speed: ms per AR step (CFG rows, ``--steps`` steps right after the prompt, and the last ``--steps`` of an
  image unless ``--no-late``) of the same checkpoint loaded as bf16 / int8 / int4 (``--precisions``), alternated,
  medians over steps where no other process used the CPU, and the paired speed-up (median over repeats of the
  speed-up within one repeat) of the early steps and of a whole image's mean step.

Where int8 / int4 run on the kernels built here (:mod:`janus_core.quant.built_kernels`), the kernels and
speed sections also time ``int8-stock`` / ``int4-stock``: the same weights on the stock kernels (oneDNN's int8
GEMM, torch's int4 kernel), as before the built kernels existed.
* quality: against the float32 model of the same random checkpoint: guided logits under teacher forcing
  (relative L2 error, top-1 agreement), greedy image tokens (576), and an understanding answer (greedy
  token agreement; text logits under teacher forcing with and without ``lm_head`` quantized). Random
  weights are not trained weights: the numbers show the quantization noise of this model, not image quality.

``python -m bench.quant probe FOLDER [--quantize int8|int4]`` is the memory probe run in the child.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from janus_core import cpu_packed
from janus_core.errors import JanusError
from janus_core.generate_ar import build_cfg_pair, cfg_logit_steps, generate_image_tokens
from janus_core.llm import KVCache, linear
from janus_core.model import JanusModel, load_model, param_bytes
from janus_core.precision import local_cpu_class
from janus_core.prompts import IMAGE_TOKENS
from janus_core.quant import kernels
from janus_core.quant.formats import MODES
from janus_core.quant.linear import quantize_modules, standard_modules
from janus_core.sampling import cfg_mix
from janus_core.understanding import generate_text_ids, understanding_embeds

from .ar import PROMPT, long_pair, time_sampler, weight_bytes_per_step
from .load import _high_water_rss, write_random_checkpoint
from .measure import StepClock, print_table, rss_bytes, summarize, wait_quiet
from .models import FIXTURES, ROOT, build_meta_net, release_config
from .run import machine_line

logger = logging.getLogger("bench.quant")

SECTIONS = ("memory", "kernels", "speed", "quality")
PRECISIONS = ("bf16", *MODES)
STOCK = "-stock"  # suffix of a mode on the stock kernels, timed where a built kernel serves the mode
GB = 1e9
FORCED_STEPS = 40
QUESTION = "Describe this image in detail."
ANSWER_TOKENS = 32


def computed_weight_bytes(name: str) -> dict[str, int]:
    """Weight bytes of the release ``name`` per precision, from the shapes alone (bf16 for everything kept)."""
    sizes = {}
    for precision in PRECISIONS:
        net = build_meta_net(release_config(name))
        if precision in MODES:
            quantize_modules(net, precision, standard_modules(net, lm_head=True, embeddings=True))
        sizes[precision] = sum(t.numel() * (t.element_size() if not t.is_floating_point() or t.dtype != torch.float32
                                            else 2) for t in net.state_dict().values())
    return sizes


def stock_variants(modes: list[str] | tuple[str, ...]) -> list[str]:
    """``<mode>-stock`` for each of ``modes`` that runs on a built kernel here (timed beside it)."""
    return [m + STOCK for m in modes if m in MODES
            and kernels.kernel_for(torch.device("cpu"), m, torch.bfloat16).layout in kernels.BUILT_LAYOUTS]


def _load(folder: Path, precision: str) -> JanusModel:
    if precision.endswith(STOCK):
        with kernels.stock_kernels():
            return _load(folder, precision.removesuffix(STOCK))
    quantize = precision if precision in MODES else None
    dtype = torch.float32 if precision == "fp32" else None  # bf16 / int8 / int4: the rest in the auto precision
    return load_model(folder, device="cpu", dtype=dtype, quantize=quantize)


# --- memory ------------------------------------------------------------------------------------------------------


def probe(folder: Path, quantize: str | None) -> dict:
    """Load ``folder`` (auto precision, ``quantize``) in this fresh process and report its memory."""
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the baseline RSS

    import_rss = rss_bytes()
    start = time.perf_counter()
    model = load_model(folder, device="cpu", quantize=quantize)
    seconds = time.perf_counter() - start
    peak, loaded = _high_water_rss(), rss_bytes()
    time_sampler(model, build_cfg_pair(model, PROMPT, 1), 1)  # prefill and one image token
    return {"weight_bytes": param_bytes(model), "import_rss": import_rss, "peak_rss": peak, "rss": loaded,
            "rss_after_step": rss_bytes(), "seconds": seconds}


def bench_memory(args: argparse.Namespace) -> None:
    name = args.memory_model
    computed = {n: computed_weight_bytes(n) for n in ("pro-1b", "pro-7b")}
    print_table("Weight bytes computed from the shapes (what a GPU holds; lm_head quantized too)",
                ["model", *PRECISIONS], [[n, *(f"{v / GB:.2f} GB" for v in c.values())] for n, c in computed.items()])
    folder = Path(args.tmp) / f"janus-quant-{name}"
    if not (folder / "model.safetensors").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("writing a random %s checkpoint to %s", name, folder)
        write_random_checkpoint(name, None, folder)
    formats = [("safetensors", folder)]
    if args.bin:
        bin_folder = Path(args.tmp) / f"janus-quant-{name}-bin"
        if not (bin_folder / "pytorch_model.bin").is_file():
            shutil.rmtree(bin_folder, ignore_errors=True)
            write_random_checkpoint(name, None, bin_folder, fmt="bin")
        formats.append(("bin", bin_folder))
    rows = []
    for fmt, path in formats:
        for precision in args.memory_precisions:
            wait_quiet()
            cmd = [sys.executable, "-m", "bench.quant", "probe", str(path)]
            if precision in MODES:
                cmd += ["--quantize", precision]
            done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            extra = r["peak_rss"] - r["import_rss"]
            rows.append([fmt, precision, r["weight_bytes"] / GB, r["import_rss"] / GB, r["peak_rss"] / GB,
                         (extra - r["weight_bytes"]) / GB, r["rss"] / GB, r["rss_after_step"] / GB, r["seconds"]])
    print_table(f"Load in a fresh process, {name} (random bf16 checkpoint), auto precision; CPU: {local_cpu_class()}",
                ["file", "precision", "weights GB", "RSS after imports GB", "peak RSS GB",
                 "peak - imports - weights GB", "RSS loaded GB", "RSS after 1 AR step GB", "load s"], rows)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
        if args.bin:
            shutil.rmtree(Path(args.tmp) / f"janus-quant-{name}-bin", ignore_errors=True)


# --- speed -------------------------------------------------------------------------------------------------------


@dataclass
class SpeedRun:
    """One precision's timed runs at one batch size, one clock per repeat: ``early`` right after the prompt,
    ``late`` ending at the last image token (empty when the late window is not measured)."""

    precision: str
    parallel: int
    early: list[StepClock]
    late: list[StepClock]

    def early_step(self, repeat: int) -> float:
        """Median seconds per early step in ``repeat``."""
        return summarize([self.early[repeat]]).median

    def image_step(self, repeat: int) -> float:
        """Mean seconds per step over a whole image in ``repeat``: the average of the early and late medians
        (exact for a step cost linear in the position), or the early median alone."""
        early = self.early_step(repeat)
        return early if not self.late else (early + summarize([self.late[repeat]]).median) / 2


def bench_speed(args: argparse.Namespace, folder: Path) -> None:
    precisions = ["bf16", *(p for p in args.precisions if p != "bf16")]  # bf16: the baseline of every speed-up
    precisions += [p for p in stock_variants(precisions) if p not in precisions]
    models = {p: _load(folder, p) for p in precisions}
    rows = []
    for parallel in args.parallel:
        pairs = {p: build_cfg_pair(m, PROMPT, parallel) for p, m in models.items()}
        late_extra = max(IMAGE_TOKENS - 1 - args.steps, 0)  # the late window ends at the image's last token
        late_pairs = {p: long_pair(m, pairs[p], late_extra) for p, m in models.items()} if args.late else {}
        for p, m in models.items():
            time_sampler(m, pairs[p], 2)  # warm-up: allocator, rope tables, kernel self-check
        runs = {p: SpeedRun(p, parallel, [], []) for p in models}
        time_late = args.late
        for _ in range(args.repeats):  # alternate, so slow phases of a shared machine hit every precision
            for p, m in models.items():
                wait_quiet()
                runs[p].early.append(time_sampler(m, pairs[p], args.steps + 1)[1])
                if not time_late:
                    continue
                try:
                    runs[p].late.append(time_sampler(m, late_pairs[p], args.steps + 1)[1])
                except JanusError as exc:  # the memory check: a long cache next to three loaded models
                    logger.warning("late window not timed at parallel %d: %s", parallel, exc)
                    time_late = False
                    for run in runs.values():
                        run.late.clear()
        base, base_best = runs["bf16"], _fastest(runs["bf16"].early)
        for p, run in runs.items():
            t, best = summarize(run.early), _fastest(run.early)
            late = f"{summarize(run.late).median * 1e3:.1f}" if run.late else ""
            rows.append([p, parallel, t.median * 1e3, summarize(base.early).median / t.median,
                         _paired_speedup(base, run, early_only=True), best * 1e3, base_best / best, late,
                         _paired_speedup(base, run, early_only=False) if run.late else "",
                         weight_bytes_per_step(models[p]) / GB, weight_bytes_per_step(models[p]) / best / GB,
                         f"{t.clean}/{t.total}"])
    print_table(f"AR decode step, {args.model}{_cut(args.layers)}, bf16 compute, 2 CFG rows per image; early: the "
                f"{args.steps} steps after the prompt, late: the last {args.steps} of an image's 576 (prompt "
                "lengthened), image: their mean (paired: median over repeats of the speed-up within one repeat, "
                "robust when the machine's speed drifts; fastest step: robust when other processes share the "
                f"CPU); CPU: {local_cpu_class()}",
                ["precision", "parallel", "early ms/step (median)", "speed-up", "speed-up (paired)",
                 "early ms/step (fastest)", "speed-up (fastest)", "late ms/step (median)", "image speed-up (paired)",
                 "weights read/step GB", "GB/s (fastest)", "clean early steps"], rows)


def _paired_speedup(base: SpeedRun, run: SpeedRun, *, early_only: bool) -> float:
    """Median over repeats of ``base``'s step time over ``run``'s in the same repeat (the runs of one repeat
    follow each other within seconds, so a slow phase of a shared host hits both): early steps, or a whole
    image's mean step (:meth:`SpeedRun.image_step`)."""

    def step(r: SpeedRun, i: int) -> float:
        return r.early_step(i) if early_only else r.image_step(i)

    return statistics.median(step(base, i) / step(run, i) for i in range(len(base.early)))


def _fastest(clocks: list[StepClock]) -> float:
    """The shortest step of ``clocks`` (other processes only ever make steps longer)."""
    return min(wall for clock in clocks for wall, _ in clock.steps())


def _cut(layers: int | None) -> str:
    return "" if layers is None else f" cut to {layers} layers"


# --- kernels -----------------------------------------------------------------------------------------------------


def layer_shapes(name: str) -> list[tuple[int, int]]:
    """``[N, K]`` of one decoder layer's matmuls as the runner joins them: q/k/v, o, gate/up, down."""
    spec = release_config(name).llm
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    return [(q + 2 * kv, h), (h, q), (2 * spec.intermediate_size, h), (h, spec.intermediate_size)]


def bench_kernels(args: argparse.Namespace) -> None:
    """One decoder layer's matmuls, bf16 in both operand orders against int8 / int4 (what each row count uses)."""
    from janus_core.quant import formats

    rows_out = []
    quant_labels = [*MODES, *stock_variants(MODES)]
    packing = cpu_packed.can_pack(torch.bfloat16)
    for name in ("pro-1b", "pro-7b"):
        layer = []
        for n, k in layer_shapes(name):
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).mul_(0.02).bfloat16()
            handles = {}
            for label in quant_labels:
                mode = label.removesuffix(STOCK)
                qweight, qscale = formats.quantize(w, mode)
                with kernels.stock_kernels() if label.endswith(STOCK) else contextlib.nullcontext():
                    choice = kernels.kernel_for(torch.device("cpu"), mode, torch.bfloat16)
                packed, scales = kernels.pack(qweight, qscale, mode, choice.layout, torch.bfloat16)
                handles[label] = kernels.QuantizedWeight(packed, scales, mode, choice.layout, choice.kernel,
                                                          formats.group_size(mode, k), (n, k))
            layer.append((w, cpu_packed.pack(w) if packing else None, handles))
        for rows in args.kernel_rows:
            times: dict[str, float] = {}
            wait_quiet()
            for w, packed, handles in layer:
                x = torch.randn(rows, w.shape[1]).bfloat16()
                candidates = {"bf16 x@W.T": lambda x=x, w=w: torch.mm(x, w.t()),
                              "bf16 W@x.T": lambda x=x, w=w: torch.mm(w, x.t()),
                              "bf16 linear()": lambda x=x, w=w: linear(x, w)}
                if packed is not None:
                    candidates["bf16 packed"] = lambda x=x, p=packed: cpu_packed.matmul(x, p)
                candidates |= {m: (lambda x=x, h=h: kernels.matmul(x, h)) for m, h in handles.items()}
                for label, fn in candidates.items():
                    times[label] = times.get(label, 0.0) + _fastest_call(fn)
            best_bf16 = min(t for label, t in times.items() if label.startswith("bf16"))
            times.setdefault("bf16 packed", float("nan"))
            order = ["bf16 x@W.T", "bf16 W@x.T", "bf16 linear()", "bf16 packed", *quant_labels]
            flop = 2 * rows * sum(w.numel() for w, _, _ in layer)
            rows_out.append([name, rows, *(f"{times[label] * 1e3:.2f}" for label in order),
                             *(f"{best_bf16 / times[m]:.2f}" for m in quant_labels),
                             f"{flop / best_bf16 / 1e9:.0f}", *(f"{flop / times[m] / 1e9:.0f}" for m in quant_labels)])
    print_table("One decoder layer's matmuls (joined q/k/v, o, gate/up, down), ms, fastest of 7 calls; bf16 "
                "linear(): the form janus_core.precision picks for plain weights on this CPU class; bf16 packed: "
                "oneDNN-packed weights (what the decoder layers use where the CPU can pack; nan: it cannot); int8 / "
                f"int4: what janus_core.quant.kernels.matmul picks for the row count (-stock: the stock kernel, "
                f"where a built one serves the mode); CPU: {local_cpu_class()}",
                ["model", "rows", "bf16 x@W.T", "bf16 W@x.T", "bf16 linear()", "bf16 packed", *quant_labels,
                 *(f"{m} vs best bf16" for m in quant_labels), "best bf16 GFLOP/s",
                 *(f"{m} GFLOP/s" for m in quant_labels)],
                rows_out)
    print_peak_throughput(packing)


def print_peak_throughput(packing: bool, rows: int = 1024, shape: tuple[int, int] = (11264, 2048)) -> None:
    """Multiply-add throughput of large matmuls (``rows`` x the 1B gate/up shape), the CPU's practical compute
    ceiling in bf16 and float32: what the many-row kernel figures above compare against."""
    gen = torch.Generator().manual_seed(1)
    w32 = torch.randn(*shape, generator=gen).mul_(0.02)
    x32 = torch.randn(rows, shape[1], generator=gen)
    w16, x16 = w32.bfloat16(), x32.bfloat16()
    candidates = {"float32 x@W.T": lambda: torch.mm(x32, w32.t()), "bf16 x@W.T": lambda: torch.mm(x16, w16.t())}
    if packing:
        packed = cpu_packed.pack(w16)
        candidates["bf16 packed"] = lambda: cpu_packed.matmul(x16, packed)
    flop = 2 * rows * w32.numel()
    wait_quiet()
    print_table(f"Large matmul throughput ({rows} x {shape[1]} times {shape[1]} x {shape[0]}), GFLOP/s, fastest of "
                f"7 calls; CPU: {local_cpu_class()}", ["form", "GFLOP/s"],
                [[label, f"{flop / _fastest_call(fn) / 1e9:.0f}"] for label, fn in candidates.items()])


def _fastest_call(fn, calls: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --- quality -----------------------------------------------------------------------------------------------------


def teacher_forced_logits(model: JanusModel, forced: torch.Tensor) -> torch.Tensor:
    """Guided logits ``[S, B, V]`` (cfg 5) with the tokens ``forced [B, S]`` fed back."""
    pair = build_cfg_pair(model, PROMPT, forced.shape[0])
    b = forced.shape[0]
    steps = cfg_logit_steps(model, pair)
    _, out = next(steps)
    logits = []
    for s in range(forced.shape[1]):
        logits.append(cfg_mix(out[:b].float(), out[b:].float(), 5.0))
        if s + 1 < forced.shape[1]:
            _, out = steps.send(forced[:, s])
    steps.close()
    return torch.stack(logits)


@torch.inference_mode()
def answer_logits(model: JanusModel, image: Image.Image, answer: list[int]) -> torch.Tensor:
    """Text logits ``[len(answer), V]`` of ``answer`` under teacher forcing (prompt prefilled, answer fed)."""
    embeds, _ = understanding_embeds(model, [image], QUESTION)
    ids = torch.tensor(answer[:-1])
    full = torch.cat([embeds, model.llm.embed(ids[None])[0]])[None]
    cache = KVCache.allocate(model.llm, 1, full.shape[1])
    hidden = model.llm.forward(full, cache)[0, embeds.shape[0] - 1:]
    return model.llm.lm_logits(hidden).float()


@dataclass
class Outputs:
    forced: torch.Tensor
    greedy: torch.Tensor
    answer: list[int]
    answer_logits: torch.Tensor


def outputs(model: JanusModel, forced: torch.Tensor, image: Image.Image, answer: list[int] | None) -> Outputs:
    embeds, _ = understanding_embeds(model, [image], QUESTION)
    ids = generate_text_ids(model, [embeds], max_new_tokens=ANSWER_TOKENS)[0]
    reference_answer = ids if answer is None else answer
    return Outputs(teacher_forced_logits(model, forced), generate_image_tokens(model, PROMPT, top_k=1), ids,
                   answer_logits(model, image, reference_answer))


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(mean relative L2 error over positions, top-1 agreement)."""
    error = ((got - want).norm(dim=-1) / want.norm(dim=-1)).mean()
    return float(error), float((got.argmax(-1) == want.argmax(-1)).float().mean())


def _agreement(a: torch.Tensor | list[int], b: torch.Tensor | list[int]) -> tuple[float, int]:
    """(fraction of equal positions, first differing position or the length)."""
    a, b = torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten()
    n = min(a.numel(), b.numel())
    same = a[:n] == b[:n]
    first = int((~same).nonzero()[0]) if not bool(same.all()) else n
    return float(same.float().mean()), first


def bench_quality(args: argparse.Namespace, folder: Path, label: str) -> None:
    image = Image.open(FIXTURES / "images" / "synthetic_200x300.png").convert("RGB")
    forced = torch.randint(0, 16384, (1, FORCED_STEPS), generator=torch.Generator().manual_seed(1234))
    reference = _load(folder, "fp32")
    ref = outputs(reference, forced.clamp(max=reference.config.vq.codebook_size - 1), image, None)
    forced = forced.clamp(max=reference.config.vq.codebook_size - 1)
    del reference
    gc.collect()
    rows = []
    variants = [("bf16", None), ("int8", True), ("int4", True), ("int8", False), ("int4", False)]
    for precision, lm_head in variants:
        quantize = precision if precision in MODES else None
        model = load_model(folder, device="cpu", dtype=torch.bfloat16, quantize=quantize,
                           quantize_lm_head=bool(lm_head))
        if lm_head is False:  # only the understanding numbers depend on lm_head
            logits = answer_logits(model, image, ref.answer)
            embeds, _ = understanding_embeds(model, [image], QUESTION)
            ids = generate_text_ids(model, [embeds], max_new_tokens=ANSWER_TOKENS)[0]
            err, top1 = _compare(logits, ref.answer_logits)
            same, first = _agreement(ids, ref.answer)
            rows.append([f"{precision} (lm_head bf16)", "", "", "", "", f"{err:.4f}", f"{top1:.3f}",
                         f"{same:.3f} (first diff {first})"])
        else:
            out = outputs(model, forced, image, ref.answer)
            err, top1 = _compare(out.forced, ref.forced)
            same, first = _agreement(out.greedy, ref.greedy)
            t_err, t_top1 = _compare(out.answer_logits, ref.answer_logits)
            a_same, a_first = _agreement(out.answer, ref.answer)
            rows.append([precision + (" (lm_head, embeddings too)" if lm_head else ""), f"{err:.4f}", f"{top1:.3f}",
                         f"{same:.3f}", str(first), f"{t_err:.4f}", f"{t_top1:.3f}",
                         f"{a_same:.3f} (first diff {a_first})"])
        del model
        gc.collect()
    print_table(f"Quality against float32, {label} (random weights: quantization noise, not image quality); CPU: "
                f"{local_cpu_class()}",
                ["precision", f"guided-logit rel. error ({FORCED_STEPS} forced steps)", "top-1 agreement",
                 f"greedy tokens equal ({IMAGE_TOKENS})", "first differing token",
                 f"answer-logit rel. error ({ANSWER_TOKENS} tokens)", "answer top-1", "greedy answer tokens equal"],
                rows)


# --- main --------------------------------------------------------------------------------------------------------


def _checkpoint(args: argparse.Namespace, layers: int | None) -> Path:
    folder = Path(args.tmp) / f"janus-quant-{args.model}-{layers or 'all'}"
    if not (folder / "model.safetensors").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_random_checkpoint(args.model, layers, folder)
    return folder


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        parser = argparse.ArgumentParser(prog="python -m bench.quant probe")
        parser.add_argument("probe")
        parser.add_argument("folder", type=Path)
        parser.add_argument("--quantize", choices=MODES, default=None)
        args = parser.parse_args()
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(probe(args.folder, args.quantize)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("pro-1b", "pro-7b"), default="pro-1b", help="speed / quality shape")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers for the speed section")
    parser.add_argument("--quality-layers", type=int, default=None, help="LLM layers for quality (default: all)")
    parser.add_argument("--parallel", type=lambda s: [int(v) for v in s.split(",") if v], default=[1, 16])
    parser.add_argument("--steps", type=int, default=16, help="timed AR steps per run")
    parser.add_argument("--kernel-rows", type=lambda s: [int(v) for v in s.split(",") if v], default=[2, 32, 512],
                        help="rows (2 per image) of the kernels section")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-late", dest="late", action="store_false",
                        help="speed: skip the late window (the last steps of an image, ~600 positions of KV cache)")
    parser.add_argument("--precisions", type=lambda s: [v for v in s.split(",") if v], default=list(PRECISIONS),
                        help=f"speed: precisions beside bf16 ({', '.join(MODES)}, or <mode>{STOCK}; <mode>{STOCK} is "
                        "added where the mode runs on a built kernel)")
    parser.add_argument("--memory-model", choices=("pro-1b", "pro-7b"), default="pro-7b")
    parser.add_argument("--memory-precisions", type=lambda s: [v for v in s.split(",") if v], default=list(PRECISIONS),
                        help="precisions loaded by the memory section (bf16 7B needs ~16 GB free RAM)")
    parser.add_argument("--bin", action="store_true", help="memory: also a pytorch_model.bin copy (1B only)")
    parser.add_argument("--tmp", default="/tmp", help="where random checkpoints are written")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoints for the next run")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sections", type=lambda s: [v for v in s.split(",") if v], default=list(SECTIONS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.time()
    print(f"# Weight-only int8 / int4 benchmark\n\nMachine: {machine_line(args.threads)}. "
          f"Load average at start: {os.getloadavg()[0]:.2f}.")
    made = []
    if "kernels" in args.sections:
        bench_kernels(args)
    if "speed" in args.sections:
        folder = _checkpoint(args, args.layers)
        made.append(folder)
        bench_speed(args, folder)
    if "quality" in args.sections:
        folder = _checkpoint(args, args.quality_layers)
        made.append(folder)
        bench_quality(args, folder, f"{args.model}{_cut(args.quality_layers)}")
    if "memory" in args.sections:
        bench_memory(args)
    if not args.keep:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nTotal bench time {time.time() - start:.0f} s; load average at end {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
