"""Every lever's settings on a full-size random-weight pipeline, one at a time or in given stacks, as the
optimizer applies them (``optimize.levers.Accelerated``): speed, what applying costs, agreement with
eager, and exact removal. Real latencies, meaningless images.

    python benchmarks/gpu_levers.py --out DIR                        # the levers after the first four
    python benchmarks/gpu_levers.py --levers layout,precision --exec graphs,eager --out DIR
    python benchmarks/gpu_levers.py --configs '[{"deepcache": true, "deepcache.cache_interval": 5, "compile": true}]'

For each configuration (each setting of each lever in ``--levers``, from the lever's own search grid,
then every ``--configs`` entry) and each execution mode:

* ``apply_s``: applying it and the first call, where compiles and graph captures happen;
* ``ms``: min and median of ``--rounds`` whole calls (``output_type="np"``, decode included) after
  the first, CUDA-synchronized, against the graph baseline (``exec="graphs"``, no lever) timed in the
  same process: ``speedup_vs_graphs``;
* agreement with fp16 eager without the lever: ``max_abs`` and ``psnr`` of the images in [0, 1];
  and with the same configuration run eagerly (``vs_eager_same``: graph modes must not change the
  answer beyond what the lever's own tolerance says);
* ``removed_exact``: after ``remove()``, an eager call without levers is bit-identical to the one
  made before anything was applied.

A configuration that raises is recorded with its error; the rest still run. ``--deadline-s`` stops
starting new configurations, so the command ends inside a bounded run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optimize.levers import LEVERS, Accelerated, Config  # noqa: E402
from optimize.levers.base import Context  # noqa: E402
from optimize.runtime.pipelines import default_guidance, is_xl, load_pipeline, resolve_pipe  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
FIRST_FOUR = ("schedule", "deepcache", "tome", "tgate")


def call(fn, steps, guidance, seed=42):
    return fn(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
              generator=torch.Generator("cpu").manual_seed(seed)).images


def psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def timed(fn, rounds):
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    return min(times), float(np.median(times))


def configs(args, pipe) -> list[tuple[str, Config]]:
    ctx = Context.of(pipe, args.steps, args.guidance, "ddim")
    out = []
    names = [n for n in args.levers.split(",") if n] if args.levers else [
        lever.name for lever in LEVERS if lever.name not in FIRST_FOUR]
    for lever in LEVERS:
        if lever.name not in names:
            continue
        reason = lever.unavailable(ctx)
        if reason is not None:
            print(f"{lever.name}: not run here: {reason}", flush=True)
            continue
        for params in list(lever.grid(ctx))[: args.max_per_lever]:
            cfg = Config(**{lever.name: params})
            out.append((cfg.label(), cfg))
    for flat in json.loads(args.configs or "[]"):
        cfg = Config.from_params(flat)
        out.append((cfg.label(), cfg))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipe", default="sd1.5")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--levers", default="", help="comma list [default: every lever after the first four]")
    ap.add_argument("--max-per-lever", type=int, default=8, help="settings per lever, from its search grid")
    ap.add_argument("--configs", default="", help="a JSON list of flat params, as stored in a study")
    ap.add_argument("--exec", default="graphs", help="comma list of execution modes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--deadline-s", type=float, default=1e9)
    ap.add_argument("--vae-fp16", action="store_true", help="SDXL: the fp16-safe VAE's setting (force_upcast off)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_levers.py needs a CUDA device")
    start = time.perf_counter()
    pipe = load_pipeline(resolve_pipe(args.pipe, random_weights=True), "ddim", "cuda", "fp16")
    pipe.set_progress_bar_config(disable=True)
    if args.vae_fp16:
        pipe.vae.register_to_config(force_upcast=False)
    args.guidance = args.guidance or default_guidance(is_xl(pipe))
    result = {"meta": {"pipe": args.pipe, "random_weights": True, "device": torch.cuda.get_device_name(),
                       "date": dt.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps,
                       "command": " ".join(sys.argv)}, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"levers-{args.pipe}" + (f"-{args.tag}" if args.tag else "") + ".json")

    reference = call(pipe, args.steps, args.guidance)  # fp16 eager, no lever: what every row is compared with
    with Accelerated(pipe, Config(), exec="graphs") as base:
        call(base, args.steps, args.guidance)
        base_ms = timed(lambda: call(base, args.steps, args.guidance), args.rounds)
    result["graphs_baseline_ms"] = base_ms
    print(f"graph baseline: {base_ms[0]:.1f} ms/call (min), eager reference made", flush=True)
    modes = [m for m in args.exec.split(",") if m]
    for label, cfg in configs(args, pipe):
        eager_same = None
        for mode in modes:
            if time.perf_counter() - start > args.deadline_s:
                result["rows"].append({"config": label, "exec": mode, "error": "not started: past --deadline-s"})
                continue
            row = {"config": label, "exec": mode, "params": cfg.to_params()}
            t = time.perf_counter()
            acc = None
            try:
                acc = Accelerated(pipe, cfg, exec=mode).apply()
                first = call(acc, args.steps, args.guidance)
                torch.cuda.synchronize()
                row["apply_s"] = time.perf_counter() - t
                row["ms_min"], row["ms_median"] = timed(lambda: call(acc, args.steps, args.guidance), args.rounds)
                row["speedup_vs_graphs"] = base_ms[0] / row["ms_min"]
                row["finite"] = bool(np.isfinite(first).all())
                row["max_abs"] = float(np.abs(first - reference).max())
                row["psnr"] = psnr(first, reference)
                if mode == "eager":
                    eager_same = first
                elif eager_same is not None:
                    row["vs_eager_same_max_abs"] = float(np.abs(first - eager_same).max())
            except Exception as exc:  # recorded; the rest still runs
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                traceback.print_exc()
            finally:
                if acc is not None:
                    acc.remove()
            try:
                row["removed_exact"] = bool(np.array_equal(call(pipe, args.steps, args.guidance), reference))
            except Exception as exc:
                row["removed_exact"] = f"{type(exc).__name__}: {exc}"[:200]
            result["rows"].append(row)
            atomic_write(path, json.dumps(result, indent=1, default=str))
            print(f"{label:28s} {mode:7s} " + (f"apply+first {row['apply_s']:6.1f} s  {row['ms_min']:7.1f} ms  "
                  f"{row['speedup_vs_graphs']:.2f}x graphs  psnr {row['psnr']:.1f}  removed {row['removed_exact']}"
                  if "error" not in row else f"ERROR {row['error'][:120]}"), flush=True)
    atomic_write(path, json.dumps(result, indent=1, default=str))
    print(f"\n{'config':28s} {'exec':7s} {'apply s':>8s} {'ms':>8s} {'x graphs':>8s} {'psnr':>6s} removed")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['config']:28s} {r['exec']:7s} error: {r['error'][:60]}")
        else:
            print(f"{r['config']:28s} {r['exec']:7s} {r['apply_s']:8.1f} {r['ms_min']:8.1f} "
                  f"{r['speedup_vs_graphs']:8.2f} {r['psnr']:6.1f} {r['removed_exact']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
