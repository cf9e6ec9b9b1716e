"""Precision, compile and layout levers on the GPU, the hand-built stack a user would assemble, and the
speed side of the sampling schedule. Full-size random-weight pipelines (``optimize.runtime.pipelines``): real
latencies, meaningless images.

    python benchmarks/gpu_stack.py step --out DIR                 # one SD1.5 UNet step, every lever
    python benchmarks/gpu_stack.py hand --out DIR                 # whole SD1.5 512/50 calls
    python benchmarks/gpu_stack.py hand --pipe sdxl --steps 30 --out DIR
    python benchmarks/gpu_stack.py schedule,vae --out DIR         # solvers x steps in graphs; SDXL VAE decode
    python benchmarks/gpu_stack.py dcprobe --pipe tiny --out DIR  # DeepCache under whole-UNet compile (CPU is enough)

Parts (comma list, run in order, one JSON each under ``--out``, written after every measurement):

* ``step``: one UNet step (CFG batch 2, the pipeline's native size, fp16 unless named) timed in each
  regime: *eager* (the UNet's Python launches every kernel), *graphs* (replayed from a CUDA graph by
  ``optimize.runtime.graphs.StepGraphs``, as ``--exec graphs`` does), *compile* (whole-UNet ``torch.compile``,
  default mode, its kernels launched by Python) and *compile + graphs* (the compiled step captured and
  replayed). Levers: bf16; channels_last and ``fuse_qkv_projections()``; the SDPA backends (flash,
  efficient, cuDNN, through ``torch.nn.attention.sdpa_kernel`` around the capture); torchao int8
  dynamic activation / int8 weight and fp8 dynamic per-row (bf16 weights) under compile. Each output
  is compared with the fp16 eager output of the same inputs: ``rel_l2`` = ||out - ref|| / ||ref||,
  ``max_rel`` = max|out - ref| / max|ref|.
* ``hand``: whole pipeline calls (``output_type="np"``, the decode included): the eager baseline, the
  graph baseline ``optimize.accelerate(pipe, {}, exec="graphs")``, DeepCache N=5 and N=3 (branch 0) in
  graphs, and the hand stack built with the libraries directly: DeepCache N=3 branch 0 (its own
  ``DeepCacheSDHelper``) + whole-UNet ``torch.compile`` + torchao fp8 (the pipeline in bf16), and the
  same without fp8; ``--configs`` adds configurations of the optimizer (a study's pick) in graphs.
  DeepCache decides full or partial step in Python; compiled as it is, Dynamo guards on the helper's
  step counter and recompiles every step (the ``dcprobe`` part counts it). The hand stack therefore
  compiles the two paths separately, as OneDiff does: the skip rule reads one flag set before each
  UNet call, so Dynamo keeps one graph for full steps and one for partial steps (``--hand-compile
  regional`` instead compiles the blocks DeepCache wraps, as Pruna does).
* ``schedule``: graph mode (``exec="graphs"``), DDIM 50 as the reference, then ddim / dpm++
  (``DPMSolverMultistepScheduler``) / unipc / dpm++ with Karras sigmas at ``--schedule-steps``; the
  scheduler is swapped before accelerating. ms/image, speedup vs DDIM 50, and a least-squares line
  ms = fixed + per_step * steps per solver (is time linear in steps).
* ``vae``: SDXL's VAE decode of a 1024 px latent in fp32 (what ``force_upcast`` makes the pipeline
  do) and in fp16: time, and whether the output is finite (random weights).
* ``dcprobe``: a pipeline call with DeepCache N=3 on a whole-UNet ``torch.compile`` (backend "eager":
  Dynamo only, no kernels generated), as it is and with the two-path flag; counts the graphs Dynamo
  made. Runs on a CPU.

Timing: CUDA events (a host clock on a CPU); warm-up calls first; then ``--rounds`` rounds; a step
round is ``--per-round`` consecutive steps between two events, a whole-call round one call. Reported:
min and median per step / per call over the rounds, and ``spread`` = (max - min) / median. Every
compile runs in its own process (``_worker``) under a wall-clock bound (``--compile-timeout``, and
what is left of ``--deadline-s``); one that runs out is recorded as "did not finish in N s" with the
phase it was in. The inductor cache (``TORCHINDUCTOR_CACHE_DIR``, Triton's too) lives under ``--tmp``
and is shared by the workers, so the ``fp16-cached`` worker, the fp16 compile again in a fresh
process, measures the compile cost once the cache holds it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gpu_graphs import call  # noqa: E402
from optimize import accelerate  # noqa: E402
from optimize.levers import Config  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402
from optimize.runtime.graphs import StepGraphs  # noqa: E402
from optimize.runtime.pipelines import (_vae, default_guidance, is_xl, load_pipeline, native_size, resolve_pipe,  # noqa: E402
                                set_scheduler)

PARTS = ("step", "hand", "schedule", "vae", "dcprobe")
STEP_TFLOP = 1.61  # SD1.5 512 px, CFG batch 2: the dense FLOP count of one step the anchors use
SDPA = ("flash", "efficient", "cudnn")


# --- building and timing --------------------------------------------------------------------------------
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(pipe_name: str, dtype: str = "fp16"):
    dev = device()
    tiny = pipe_name.startswith("tiny")
    pipe = load_pipeline(resolve_pipe(pipe_name, random_weights=not tiny), "ddim", dev,
                         dtype if dev == "cuda" else "fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_rounds(fn, warmup: int, rounds: int, per_round: int = 1) -> dict:
    """ms per call of ``fn``: ``warmup`` untimed calls, then ``rounds`` rounds of ``per_round`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_round):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / per_round)
        else:
            t = time.perf_counter()
            for _ in range(per_round):
                fn()
            times.append(1000 * (time.perf_counter() - t) / per_round)
    med = float(np.median(times))
    return {"min_ms": float(min(times)), "median_ms": med, "spread": float((max(times) - min(times)) / med),
            "rounds": rounds, "per_round": per_round, "samples_ms": [round(x, 4) for x in times]}


def step_inputs(pipe, dtype, seed: int = 0) -> dict:
    """One CFG step's inputs (batch 2), seeded; SDXL's added conditions included."""
    unet = pipe.unet
    g = torch.Generator("cpu").manual_seed(seed)
    s = unet.config.sample_size
    dev = pipe.device
    x = torch.randn(2, unet.config.in_channels, s, s, generator=g).to(dev, dtype)
    c = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dev, dtype)
    kw = {"encoder_hidden_states": c, "return_dict": False}
    if is_xl(pipe):
        size = native_size(pipe)
        pooled = torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=g).to(dev, dtype)
        ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=dev, dtype=dtype)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    return {"x": x, "t": torch.tensor(500, device=dev), "kw": kw}


def cast_inputs(inp: dict, dtype, channels_last: bool = False) -> dict:
    def cast(v):
        if isinstance(v, dict):
            return {k: cast(w) for k, w in v.items()}
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return v

    x = inp["x"].to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return {"x": x, "t": inp["t"], "kw": cast(inp["kw"])}


def step_fn(module, inp):
    return lambda: module(inp["x"], inp["t"], **inp["kw"])[0]


def diff(out, ref) -> dict:
    o, r = out.float(), ref.float()
    d = (o - r).abs()
    return {"rel_l2": float((o - r).norm() / r.norm()), "max_rel": float(d.max() / r.abs().max()),
            "finite": bool(torch.isfinite(o).all())}


def with_tflops(row: dict, pipe_name: str) -> dict:
    if pipe_name == "sd1.5" and "min_ms" in row:
        row["tflops_at_min"] = round(STEP_TFLOP / (row["min_ms"] / 1000), 1)
    return row


class Graphed:
    """``StepGraphs`` around a module for the block (the project's graph regime), freed after."""

    def __init__(self, module):
        self.graphs = StepGraphs(module)

    def __enter__(self):
        self.graphs.install()
        return self.graphs

    def __exit__(self, *exc):
        self.graphs.close()


def quant_config(name: str):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow)

    # set_inductor_config=False: the same inductor settings as the plain compile, so the compile
    # times compare (torchao's recommended settings add coordinate-descent tuning to every kernel)
    if name == "int8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if name == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    raise ValueError(name)


def torch_versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("diffusers", "torchao", "DeepCache", "transformers", "triton"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"not importable: {type(exc).__name__}"
    return out


# --- compile workers (one process each, bounded by the parent) ------------------------------------------
def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def worker_step(job: dict, save) -> None:
    """Compile one UNet variant and time it; ``save`` persists the row after every phase."""
    row = {"label": job["label"], "phase": "build", "inductor_cache_files_at_start": job.get("_cache_files")}
    t0 = time.perf_counter()
    pipe = build(job["pipe"])
    unet = pipe.unet
    row["build_s"] = time.perf_counter() - t0
    inp = step_inputs(pipe, unet.dtype)
    with torch.no_grad():
        ref = step_fn(unet, inp)().clone()
        dtype = torch.bfloat16 if job["dtype"] == "bf16" and device() == "cuda" else unet.dtype
        if dtype != unet.dtype:
            unet.to(dtype)
        if job.get("fuse_qkv"):
            unet.fuse_qkv_projections()
        if job.get("channels_last"):
            unet.to(memory_format=torch.channels_last)
        inp = cast_inputs(inp, dtype, job.get("channels_last", False))
        same_dtype_ref = step_fn(unet, inp)().clone() if dtype != ref.dtype else None
        if job.get("quant"):
            from torchao.quantization import quantize_

            row["phase"] = "quantize"
            save(row)
            t = time.perf_counter()
            quantize_(unet, quant_config(job["quant"]))
            row["quantize_s"] = time.perf_counter() - t
            out = step_fn(unet, inp)()
            row["quant_eager"] = {**time_rounds(step_fn(unet, inp), 2, job["rounds"], job["per_round"]),
                                  **diff(out, ref)}
            save(row)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        backend = job.get("backend", "inductor")
        compiled = torch.compile(unet, **({"mode": job.get("mode", "default")} if backend == "inductor" else {}),
                                 backend=backend)
        row["phase"] = "compile"
        save(row)
        sync()
        t = time.perf_counter()
        out = step_fn(compiled, inp)()
        sync()
        row["compile_s"] = time.perf_counter() - t
        row["dynamo_graphs"] = dynamo_graphs()
        row.update(diff(out, ref))
        if same_dtype_ref is not None:
            row["vs_same_dtype_eager"] = diff(out, same_dtype_ref)
        row["phase"] = "time compile"
        save(row)
        row["compile"] = with_tflops(time_rounds(step_fn(compiled, inp), 3, job["rounds"], job["per_round"]),
                                     job["pipe"])
        save(row)
        if device() == "cuda":
            row["phase"] = "compile + graphs"
            save(row)
            with Graphed(compiled):
                out = step_fn(compiled, inp)()
                row["compile_graphs"] = with_tflops({**time_rounds(step_fn(compiled, inp), 3, job["rounds"],
                                                                   job["per_round"]), **diff(out, ref)}, job["pipe"])
        row["dynamo_graphs_end"] = dynamo_graphs()
    row["phase"] = "done"
    save(row)


class TwoPathDeepCache:
    """DeepCache's own helper, with its per-step decision taken once before each UNet call.

    ``DeepCacheSDHelper`` wraps every block with Python that asks ``is_skip_step``, which reads the
    helper's step counter; under a whole-UNet ``torch.compile`` Dynamo guards on that counter and
    compiles a new graph for every step. Here the UNet wrapper computes the same rule once per call
    (``(step - first step) % interval``) into one boolean, and ``is_skip_step`` reads only that boolean
    and the fixed branch: Dynamo keeps one graph for the full step and one for the partial step.
    """

    def __init__(self, pipe, interval: int, branch: int, compile_fn=None):
        from DeepCache import DeepCacheSDHelper

        self.pipe = pipe
        self.helper = h = DeepCacheSDHelper(pipe=pipe)
        h.set_params(cache_interval=interval, cache_branch_id=branch)
        h.enable()
        h.partial = False
        block, layer = h.params["cache_block_id"], h.params["cache_layer_id"]

        def is_skip_step(block_i, layer_i, blocktype="down"):
            if not h.partial:
                return False
            if block_i > block or blocktype == "mid":
                return True
            if block_i < block:
                return False
            return layer_i >= layer if blocktype == "down" else layer_i > layer

        h.is_skip_step = is_skip_step
        forward = h.function_dict["unet_forward"]  # the UNet's own forward, DeepCache's block wrappers inside
        self.forward = compile_fn(forward) if compile_fn else forward

        def unet_forward(*args, **kwargs):
            h.cur_timestep = list(pipe.scheduler.timesteps).index(args[1].item())
            if h.start_timestep is None:
                h.start_timestep = h.cur_timestep
            h.partial = (h.cur_timestep - h.start_timestep) % interval != 0
            return self.forward(*args, **kwargs)

        pipe.unet.forward = unet_forward

    def reset(self) -> None:
        """Before each pipeline call, as DeepCache's own pipelines start a call."""
        self.helper.cur_timestep, self.helper.start_timestep, self.helper.cached_output = 0, None, {}


def regional_deepcache(pipe, interval: int, branch: int, backend: str = "inductor"):
    """DeepCache's helper with each block it wraps compiled on its own (Pruna's way): the helper's
    Python stays eager around compiled blocks."""
    from DeepCache import DeepCacheSDHelper

    h = DeepCacheSDHelper(pipe=pipe)
    h.set_params(cache_interval=interval, cache_branch_id=branch)
    h.enable()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for key, fn in list(h.function_dict.items()):
        if key != "unet_forward" and key[1] != "block":
            h.function_dict[key] = torch.compile(fn, dynamic=False, backend=backend)
    return h


def worker_hand(job: dict, save) -> None:
    """One hand stack: build, quantize, DeepCache, compile (first call), then timed calls."""
    row = {"label": job["label"], "phase": "build", "inductor_cache_files_at_start": job.get("_cache_files")}
    t0 = time.perf_counter()
    pipe = build(job["pipe"])
    xl = is_xl(pipe)
    steps, guidance = job["steps"], default_guidance(xl)
    row["build_s"] = time.perf_counter() - t0
    with torch.no_grad():
        ref = call(pipe, steps, 1, guidance) if job.get("reference", True) else None
        if job["dtype"] == "bf16" and device() == "cuda":
            pipe.to(dtype=torch.bfloat16)
        if job.get("quant"):
            from torchao.quantization import quantize_

            row["phase"] = "quantize"
            save(row)
            t = time.perf_counter()
            quantize_(pipe.unet, quant_config(job["quant"]))
            row["quantize_s"] = time.perf_counter() - t
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        how = job.get("compile", "two-path")
        backend = job.get("backend", "inductor")
        if how == "regional":
            helper = regional_deepcache(pipe, job["interval"], job["branch"], backend)

            def reset():
                helper.cur_timestep, helper.start_timestep, helper.cached_output = 0, None, {}
        else:
            options = {"mode": job.get("mode", "default")} if backend == "inductor" else {}
            compile_fn = None if how == "none" else (lambda f: torch.compile(f, backend=backend, **options))
            stack = TwoPathDeepCache(pipe, job["interval"], job["branch"], compile_fn)
            reset = stack.reset

        def run():
            reset()
            return call(pipe, steps, 1, guidance)

        row["phase"] = "first call (compiles)"
        save(row)
        sync()
        t = time.perf_counter()
        out = run()
        row["first_call_s"] = time.perf_counter() - t
        row["dynamo_graphs_first_call"] = dynamo_graphs()
        row["phase"] = "second call"
        save(row)
        t = time.perf_counter()
        run()
        row["second_call_s"] = time.perf_counter() - t
        row["finite"] = bool(np.isfinite(out).all())
        if ref is not None:
            row["max_abs_diff_vs_fp16_eager_baseline"] = float(np.abs(out - ref).max())
        row["phase"] = "timing"
        save(row)
        row.update(time_rounds(run, 1, job["rounds"]))
        row["dynamo_graphs"] = dynamo_graphs()
    row["phase"] = "done"
    save(row)


def worker_main(args) -> None:
    job = json.loads(args.job)
    result_path = args.result

    def save(row):
        atomic_write(result_path, json.dumps(row, indent=1, default=str))

    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    entries = sum(len(files) for _, _, files in os.walk(cache)) if cache and os.path.isdir(cache) else 0
    job["_cache_files"] = entries
    save({"label": job["label"], "phase": "start", "inductor_cache_files_at_start": entries})
    try:
        {"step": worker_step, "hand": worker_hand}[job["kind"]](job, save)
    except Exception as exc:  # recorded; the parent reads the file
        traceback.print_exc()
        try:
            with open(result_path) as f:
                row = json.load(f)
        except (OSError, ValueError):
            row = {"label": job["label"]}
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
        save(row)


def run_worker(job: dict, args, budget_s: float) -> dict:
    """Run ``job`` in its own process (own session), killed with its compile workers after ``budget_s``."""
    os.makedirs(args.tmp, exist_ok=True)
    path = os.path.join(args.tmp, f"worker-{job['label']}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "_worker", "--job", json.dumps(job), "--result", path]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, env=worker_env(args))
    timed_out = False
    try:
        proc.wait(timeout=max(budget_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group: it and its compile pool
        except ProcessLookupError:
            pass
        proc.wait()
    wall = time.perf_counter() - t
    try:
        with open(path) as f:
            row = json.load(f)
    except (OSError, ValueError):
        row = {"label": job["label"]}
    row.update(job=job, wall_s=round(wall, 1), returncode=proc.returncode)
    if timed_out:
        row["did_not_finish"] = f"did not finish in {budget_s:.0f} s (phase: {row.get('phase', 'start')})"
    elif proc.returncode != 0 and "error" not in row:
        row["error"] = f"worker exited with {proc.returncode} (phase: {row.get('phase', 'start')})"
    return row


def worker_env(args) -> dict:
    env = dict(os.environ)
    cache = os.path.join(args.tmp, "inductor-cache")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
    env.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- parts ----------------------------------------------------------------------------------------------
class Part:
    """A part's result, saved after each row."""

    def __init__(self, args, name: str):
        self.args, self.name = args, name
        tag = f"-{args.tag}" if args.tag else ""
        pipe = "sdxl" if name == "vae" and not args.pipe.startswith("tiny") else args.pipe  # the vae part is SDXL's
        self.path = os.path.join(args.out, f"stack-{pipe}-{name}{tag}.json")
        self.data = {"meta": {**meta(args, name), "pipe": pipe}, "rows": []}

    def add(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.save()
        brief = {k: v for k, v in row.items() if k not in ("samples_ms", "job")}
        print(f"  {json.dumps(brief, default=str)[:700]}", flush=True)
        return row

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1, default=str))


def meta(args, part: str) -> dict:
    dev = device()
    out = {"part": part, "pipe": args.pipe, "random_weights": not args.pipe.startswith("tiny"),
           "device": torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or "cpu"),
           "date": dt.date.today().isoformat(), "command": " ".join(sys.argv), "versions": torch_versions(),
           "rounds": args.rounds, "per_round": args.per_round}
    return out


def remaining(args) -> float:
    return args.deadline - time.perf_counter()


def budget(args, reserve: float = 5.0) -> float:
    return min(args.compile_timeout, remaining(args) - reserve)


@torch.no_grad()
def run_step(args, part: Part) -> None:
    pipe = build(args.pipe)
    unet = pipe.unet
    inp = step_inputs(pipe, unet.dtype)
    cuda = device() == "cuda"
    ref = step_fn(unet, inp)().clone()
    R, K = args.rounds, args.per_round
    if args.only_compile:
        del pipe, unet
        return run_step_workers(args, part)

    def measure(label, regime, module, inputs, graphs: bool, ctx=None, **extra):
        row = {"label": label, "regime": regime, **extra}
        try:
            with (ctx() if ctx else _null()):
                if graphs:
                    if not cuda:
                        row["skipped"] = "graphs need CUDA"
                        return part.add(row)
                    with Graphed(module):
                        out = step_fn(module, inputs)()
                        row.update(time_rounds(step_fn(module, inputs), 3, R, K))
                else:
                    out = step_fn(module, inputs)()
                    row.update(time_rounds(step_fn(module, inputs), 3, R, K))
            row.update(diff(out, ref))
        except Exception as exc:  # noqa: BLE001 - recorded, the rest still runs
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        return part.add(with_tflops(row, args.pipe))

    measure("fp16", "eager", unet, inp, False)
    measure("fp16", "graphs", unet, inp, True)
    measure("fp16", "eager", unet, inp, False, note="eager again: its spread between two runs in one process")
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION}
        for name in SDPA:
            measure(f"fp16 sdpa={name}", "graphs", unet, inp, True, ctx=lambda b=backends[name]: sdpa_kernel(b))
    # layouts on copies, so the reference UNet stays as built
    for label, fuse, cl in (("fp16 fuse_qkv", True, False), ("fp16 channels_last", False, True),
                            ("fp16 fuse_qkv+channels_last", True, True)):
        m = copy.deepcopy(unet)
        if fuse:
            m.fuse_qkv_projections()
        if cl:
            m.to(memory_format=torch.channels_last)
        i = cast_inputs(inp, m.dtype, cl)
        measure(label, "eager", m, i, False)
        measure(label, "graphs", m, i, True)
        del m
    if cuda:
        m = copy.deepcopy(unet).to(torch.bfloat16)
        i = cast_inputs(inp, torch.bfloat16)
        measure("bf16", "eager", m, i, False)
        measure("bf16", "graphs", m, i, True)
        del m
        torch.cuda.empty_cache()
    del pipe, unet
    run_step_workers(args, part)


def run_step_workers(args, part: Part) -> None:
    """The compiled variants, each in its own bounded process."""
    R, K, cuda = args.rounds, args.per_round, device() == "cuda"
    jobs = [
        {"label": "compile-fp16", "dtype": "fp16"},
        {"label": "compile-fp16-cached", "dtype": "fp16", "note": "the same compile again in a fresh process: "
                                                                  "the inductor cache holds it now"},
        {"label": "compile-fp8-rowwise-bf16", "dtype": "bf16", "quant": "fp8"},
        {"label": "compile-int8-dyn-bf16", "dtype": "bf16", "quant": "int8"},
        {"label": "compile-bf16", "dtype": "bf16"},
        {"label": "compile-fp16-fuse_qkv+channels_last", "dtype": "fp16", "fuse_qkv": True, "channels_last": True},
    ]
    if not cuda:
        jobs = [j for j in jobs if j.get("quant") != "fp8"]
    wanted = set(args.compile_variants.split(",")) if args.compile_variants else None
    for job in jobs:
        if wanted is not None and job["label"] not in wanted:
            continue
        job.update(kind="step", pipe=args.pipe, rounds=R, per_round=K, backend=args.compile_backend)
        b = budget(args)
        if b < args.min_compile_s:
            part.add({"label": job["label"], "regime": "compile", "not_run": f"{remaining(args):.0f} s left of the deadline"})
            continue
        print(f"== worker {job['label']} (bound {b:.0f} s)", flush=True)
        part.add({"regime": "compile", **run_worker(job, args, b)})


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_hand(args, part: Part) -> None:
    steps = args.steps
    R = args.call_rounds
    cuda = device() == "cuda"
    if args.only_compile:
        return run_hand_workers(args, part)
    pipe = build(args.pipe)
    xl = is_xl(pipe)
    guidance = default_guidance(xl)
    with torch.no_grad():
        row = {"label": "baseline", "regime": "eager", "steps": steps}
        row.update(time_rounds(lambda: call(pipe, steps, 1, guidance), 1, max(2, R - 2)))
        part.add(row)
        if cuda:
            for label, params in (("baseline", {}),
                                  ("dc(5,b0)", {"deepcache": True, "deepcache.cache_interval": 5,
                                                "deepcache.cache_branch_id": 0}),
                                  ("dc(3,b0)", {"deepcache": True, "deepcache.cache_interval": 3,
                                                "deepcache.cache_branch_id": 0}),
                                  *((Config.from_params(p).label(), p) for p in json.loads(args.configs))):
                row = {"label": label, "regime": "graphs", "steps": steps,
                       "how": f"optimize.accelerate(pipe, {params}, exec='graphs')"}
                try:
                    with accelerate(pipe, params, exec="graphs") as fast:
                        row.update(time_rounds(lambda: call(fast, steps, 1, guidance), 1, R))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                part.add(row)
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    run_hand_workers(args, part)


def run_hand_workers(args, part: Part) -> None:
    """The hand stacks, each in its own bounded process."""
    steps, R, cuda = args.steps, args.call_rounds, device() == "cuda"
    jobs = [
        {"label": "hand-dc3-compile-fp8-bf16", "dtype": "bf16", "quant": "fp8"},
        {"label": "hand-dc3-compile-fp16", "dtype": "fp16"},
        {"label": "hand-dc3-compile-int8-bf16", "dtype": "bf16", "quant": "int8"},
    ]
    if args.hand_compile == "regional":
        jobs = [{**j, "label": j["label"].replace("compile", "regional"), "compile": "regional"} for j in jobs]
    if not cuda:
        jobs = [j for j in jobs if j.get("quant") != "fp8"]
    wanted = set(args.hand_variants.split(",")) if args.hand_variants else None
    for job in jobs:
        if wanted is not None and job["label"] not in wanted:
            continue
        job.update(kind="hand", pipe=args.pipe, steps=steps, interval=3, branch=0, rounds=R,
                   compile=job.get("compile", args.hand_compile), backend=args.compile_backend)
        b = budget(args)
        if b < args.min_compile_s:
            part.add({"label": job["label"], "regime": "compile", "not_run": f"{remaining(args):.0f} s left of the deadline"})
            continue
        print(f"== worker {job['label']} (bound {b:.0f} s)", flush=True)
        part.add({"regime": "compile", **run_worker(job, args, b)})


SOLVERS = {  # label -> (scheduler class, extra config)
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm++karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


@torch.no_grad()
def run_schedule(args, part: Part) -> None:
    import diffusers

    pipe = build(args.pipe)
    guidance = default_guidance(is_xl(pipe))
    exec_mode = "graphs" if device() == "cuda" else "eager"
    base_config = dict(pipe.scheduler.config)
    reference = None
    for solver in SOLVERS:
        counts = ([args.steps] if solver == "ddim" else []) + [n for n in args.schedule_steps
                                                                 if solver != "ddim" or n != args.steps]
        name, extra = SOLVERS[solver]
        pipe.scheduler = getattr(diffusers, name).from_config(base_config, **extra)
        try:
            with accelerate(pipe, {}, exec=exec_mode) as fast:
                for n in counts:
                    if remaining(args) < 10:
                        part.add({"solver": solver, "steps": n, "not_run": "deadline"})
                        continue
                    row = {"solver": solver, "scheduler": name, **extra, "steps": n, "regime": exec_mode}
                    row.update(time_rounds(lambda: call(fast, n, 1, guidance), 1, args.call_rounds))
                    if solver == "ddim" and n == args.steps:
                        reference = row["min_ms"]
                        part.data["reference"] = {"solver": "ddim", "steps": n, "min_ms": reference}
                    if reference:
                        row["speedup_vs_ddim_ref"] = reference / row["min_ms"]
                    part.add(row)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            part.add({"solver": solver, "error": f"{type(exc).__name__}: {exc}"[:400]})
    # is time linear in steps? least squares per solver
    fits = {}
    for solver in SOLVERS:
        pts = [(r["steps"], r["min_ms"]) for r in part.data["rows"] if r.get("solver") == solver and "min_ms" in r]
        if len(pts) >= 3:
            s, ms = np.array(pts, dtype=float).T
            slope, intercept = np.polyfit(s, ms, 1)
            resid = ms - (slope * s + intercept)
            fits[solver] = {"per_step_ms": float(slope), "fixed_ms": float(intercept),
                            "max_abs_residual_ms": float(np.abs(resid).max()),
                            "max_rel_residual": float(np.max(np.abs(resid) / ms))}
    part.data["linear_fit"] = fits
    part.save()
    set_scheduler(pipe, "ddim")


@torch.no_grad()
def run_vae(args, part: Part) -> None:
    """SDXL's VAE (its config's scaling factor) decoding a 1024 px latent, fp32 vs fp16."""
    dev = device()
    torch.manual_seed(0)
    with torch.device(dev):
        vae = _vae(0.13025)
    side = 128 if not args.pipe.startswith("tiny") else 16
    lat = torch.randn(1, 4, side, side, device=dev, generator=torch.Generator(dev).manual_seed(0))
    outs = {}
    for label, dtype in (("fp32 (force_upcast)", torch.float32), ("fp16", torch.float16)):
        if dtype == torch.float16 and dev != "cuda":
            continue
        vae.to(dtype)
        fn = lambda: vae.decode((lat.to(dtype)) / vae.config.scaling_factor, return_dict=False)[0]  # noqa: E731
        row = {"label": label, "regime": "eager", "latent": list(lat.shape)}
        row.update(time_rounds(fn, 2, args.call_rounds, 1))
        out = fn().float()
        outs[label] = out
        row["finite"] = bool(torch.isfinite(out).all())
        row["max_abs"] = float(out.abs().max()) if row["finite"] else None
        part.add(row)
    if len(outs) == 2:
        a, b = outs.values()
        part.data["fp16_vs_fp32"] = diff(b, a)
        part.save()


def run_dcprobe(args, part: Part) -> None:
    """DeepCache N=3 b0 on a whole-UNet compile (Dynamo only): as it is, and with the two-path flag."""
    import torch._dynamo as dynamo
    from DeepCache import DeepCacheSDHelper
    from torch._dynamo.utils import counters

    steps = min(args.steps, 10)
    for variant in ("as-is", "two-path"):
        dynamo.reset()
        counters.clear()
        dynamo.config.cache_size_limit = 64
        pipe = build(args.pipe)
        guidance = default_guidance(is_xl(pipe))
        row = {"label": variant, "steps": steps, "backend": "eager", "calls": 2}
        try:
            with torch.no_grad():
                ref = call(pipe, steps, 1, guidance)
                if variant == "as-is":
                    pipe.unet = torch.compile(pipe.unet, backend="eager")
                    h = DeepCacheSDHelper(pipe=pipe)
                    h.set_params(cache_interval=3, cache_branch_id=0)
                    h.enable()

                    def reset(h=h):
                        h.cur_timestep, h.start_timestep, h.cached_output = 0, None, {}
                else:
                    stack = TwoPathDeepCache(pipe, 3, 0, lambda f: torch.compile(f, backend="eager"))
                    reset = stack.reset
                t = time.perf_counter()
                reset()
                out = call(pipe, steps, 1, guidance)
                row["first_call_s"] = time.perf_counter() - t
                row["graphs_after_first_call"] = dynamo_graphs()
                reset()
                out2 = call(pipe, steps, 1, guidance)
                row["graphs_after_second_call"] = dynamo_graphs()
                row["second_call_equal_first"] = bool(np.array_equal(out, out2))
                row["max_abs_diff_vs_no_deepcache"] = float(np.abs(out - ref).max())
            # the same configuration eagerly through the project, for the image
            pipe2 = build(args.pipe)
            with torch.no_grad(), accelerate(pipe2, {"deepcache": True, "deepcache.cache_interval": 3}) as fast:
                want = call(fast, steps, 1, guidance)
            row["max_abs_diff_vs_eager_deepcache"] = float(np.abs(out - want).max())
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        part.add(row)


# --- summary ----------------------------------------------------------------------------------------------
def summary(part: Part) -> None:
    m = part.data["meta"]
    print(f"\n{part.name}: {m['pipe']} on {m['device']}, {m['date']}")
    for r in part.data["rows"]:
        label = r.get("label") or f"{r.get('solver')} {r.get('steps')}"
        regime = r.get("regime", "")
        if "min_ms" in r:
            extra = f" rel_l2 {r['rel_l2']:.2e}" if "rel_l2" in r else ""
            extra += f" {r['speedup_vs_ddim_ref']:.2f}x vs ddim{part.args.steps}" if "speedup_vs_ddim_ref" in r else ""
            extra += f" first call {r['first_call_s']:.0f} s" if "first_call_s" in r else ""
            print(f"  {label:40s} {regime:8s} min {r['min_ms']:8.2f} ms  median {r['median_ms']:8.2f}  "
                  f"spread {100 * r['spread']:4.1f}%{extra}")
        elif "compile_s" in r or "did_not_finish" in r or "error" in r:
            c, g = r.get("compile", {}), r.get("compile_graphs", {})
            line = f"  {label:40s} {regime:8s}"
            if "compile_s" in r:
                line += f" compile {r['compile_s']:.0f} s"
            if c:
                line += f" | launched min {c['min_ms']:.2f} ms"
            if g:
                line += f" | +graphs min {g['min_ms']:.2f} ms"
            if "rel_l2" in r:
                line += f" | rel_l2 {r['rel_l2']:.2e}"
            for k in ("did_not_finish", "error", "not_run", "skipped"):
                if k in r:
                    line += f" | {k}: {str(r[k])[:160]}"
            print(line)
        else:
            print(f"  {json.dumps({k: v for k, v in r.items() if k not in ('job', 'samples_ms')}, default=str)[:300]}")
    if part.data.get("linear_fit"):
        for s, f in part.data["linear_fit"].items():
            print(f"  linear fit {s:12s} {f['per_step_ms']:.2f} ms/step + {f['fixed_ms']:.1f} ms, max residual "
                  f"{100 * f['max_rel_residual']:.1f}%")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("_worker")
        ap.add_argument("--job", required=True)
        ap.add_argument("--result", required=True)
        worker_main(ap.parse_args())
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", help=f"comma list of: {', '.join(PARTS)}")
    ap.add_argument("--pipe", default="sd1.5", help="sd1.5, sd2.1, sdxl (random weights) or tiny")
    ap.add_argument("--steps", type=int, default=50, help="steps of a whole call (hand; schedule's reference)")
    ap.add_argument("--schedule-steps", default="10,15,20,25,30")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds of a step")
    ap.add_argument("--per-round", type=int, default=10, help="steps per timed round")
    ap.add_argument("--call-rounds", type=int, default=5, help="timed whole calls")
    ap.add_argument("--compile-timeout", type=float, default=240.0, help="bound on each compile worker (s)")
    ap.add_argument("--min-compile-s", type=float, default=90.0,
                    help="start no compile worker with less than this left before the deadline")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no compile worker past this many seconds")
    ap.add_argument("--compile-variants", default="", help="step: only these worker labels (comma list)")
    ap.add_argument("--only-compile", action="store_true", help="step, hand: only the compile workers")
    ap.add_argument("--hand-variants", default="", help="hand: only these worker labels (comma list)")
    ap.add_argument("--configs", default="[]",
                    help="hand: more of the optimizer's configurations timed beside the hand stack, in graphs (a JSON "
                         "list of flat params, as a study stores them: a study's pick)")
    ap.add_argument("--hand-compile", default="two-path", choices=("two-path", "regional"))
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the workers (\"eager\": Dynamo only, to check the code paths quickly)")
    ap.add_argument("--fresh-cache", action="store_true", help="empty the inductor cache under --tmp first")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tmp", default="/tmp/gpu_stack")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s): {', '.join(unknown)} (known: {', '.join(PARTS)})")
    args.schedule_steps = [int(x) for x in args.schedule_steps.split(",") if x]
    args.deadline = time.perf_counter() + args.deadline_s
    os.makedirs(args.out, exist_ok=True)
    if args.fresh_cache:
        shutil.rmtree(os.path.join(args.tmp, "inductor-cache"), ignore_errors=True)
    os.environ.update({k: v for k, v in worker_env(args).items() if k.startswith(("TORCHINDUCTOR", "TRITON"))})
    runners = {"step": run_step, "hand": run_hand, "schedule": run_schedule, "vae": run_vae, "dcprobe": run_dcprobe}
    done = []
    for name in parts:
        print(f"== {name} ({remaining(args):.0f} s left)" if args.deadline_s < 1e8 else f"== {name}", flush=True)
        part = Part(args, name)
        t = time.perf_counter()
        try:
            runners[name](args, part)
        except Exception as exc:  # noqa: BLE001 - the next part still runs
            traceback.print_exc()
            part.data["error"] = f"{type(exc).__name__}: {exc}"[:600]
        part.data["meta"]["part_s"] = time.perf_counter() - t
        part.save()
        done.append(part)
    for part in done:
        summary(part)


if __name__ == "__main__":
    main()
