"""Graph execution on a GPU with full-size random-weight pipelines: graphed output vs eager output for
every method combination, end-to-end speed against the eager baseline, timing precision (P1) in graph
mode, memory over apply/remove cycles, capture cost in a scored trial, and regional compile.

    python benchmarks/gpu_graphs.py --pipe sd1.5 --parts equal,e2e,p1,memory,overhead,compile --out DIR
    python benchmarks/gpu_graphs.py --pipe sdxl --steps 30 --parts equal,e2e --equal-steps 20 --out DIR

Every speed number names its regime. ``e2e`` times through the optimizer's own protocol
(``optimize.measure.evaluator.Evaluator``): the eager baseline with ``time_eager`` (warm-up, then ``--calls``
calls, per-step floor) and each configuration in graph mode with ``Evaluator.time`` (paired rounds
against the graph-mode baseline). "vs eager" = eager baseline floor / configuration floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optimize.levers import Accelerated, Config, DeepCache, TGate, ToMe  # noqa: E402
from optimize.runtime.graphs import PipelineGraphs, compile_blocks  # noqa: E402
from optimize.measure.evaluator import Evaluator, GenerationSettings  # noqa: E402
from optimize.runtime.pipelines import default_guidance, is_xl, load_pipeline, native_size, resolve_pipe  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
PARTS = ("equal", "e2e", "p1", "memory", "overhead", "compile", "breakdown")


class _NoScore:
    """Scoring is not what is measured here (P2 measured the CLIP cost)."""

    def score(self, images, prompts):
        return np.ones(len(images))


def combos(xl: bool, steps: int) -> list[Config]:
    gate = min(10, steps - 2)
    out = []
    for dc, tome, tgate in itertools.product([False, True], repeat=3):
        out.append(Config(deepcache=DeepCache(3, 1) if dc else None, tome=ToMe(0.5, 2 if xl else 1) if tome else None,
                          tgate=TGate(gate, 3, 2, 2) if tgate else None))
    out.append(Config(deepcache=DeepCache(5, 0), tome=ToMe(0.7, 2), tgate=TGate(min(5, steps - 2), 2, 1, 1)))
    return out


def call(fn, steps, batch, guidance, seed=42):
    return fn(prompt=[PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
              generator=torch.Generator("cpu").manual_seed(seed)).images


def run_equal(pipe, args, xl):
    rows = []
    for steps, batch in args.equal:
        for cfg in combos(xl, steps):
            row = {"config": cfg.label(), "steps": steps, "batch": batch}
            try:
                with Accelerated(pipe, cfg) as eager:
                    want = [call(eager, steps, batch, args.guidance) for _ in range(2)]
                acc = Accelerated(pipe, cfg, exec="graphs").apply()
                try:
                    got = [call(acc, steps, batch, args.guidance) for _ in range(2)]
                    row["captures"] = acc.graphs.stats.captures
                finally:
                    acc.remove()
                row["eager_repeatable"] = bool(np.array_equal(want[0], want[1]))
                row["eager_self_diff"] = float(np.abs(want[0] - want[1]).max())  # ToMe's scatter is not deterministic
                row["equal"] = all(bool(np.array_equal(g, w)) for g, w in zip(got, want))
                row["max_diff"] = float(max(np.abs(g - w).max() for g, w in zip(got, want)))
                row["error"] = ""
            except Exception as exc:  # recorded, the rest still runs
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                traceback.print_exc()
            print(row, flush=True)
            rows.append(row)
    return rows


def evaluator(pipe, args, exec_mode, prompts=1, rounds=None):
    size = native_size(pipe)
    settings = GenerationSettings(args.steps, args.guidance, size, size, args.batch, 42)
    return Evaluator(pipe, _NoScore(), [PROMPT] * max(prompts, args.batch), settings,
                     repeats=args.calls if rounds is None else rounds, exec=exec_mode)


def run_e2e(pipe, args, xl):
    ev = evaluator(pipe, args, "graphs")
    eager = ev.time_eager(args.calls)
    rows = [{"config": "baseline", "regime": "eager", "floor_ms": 1000 * eager.best, "median_ms": 1000 * eager.median,
             "spread": eager.spread, "vs_eager": 1.0}]
    configs = [Config()] + [Config(deepcache=DeepCache(n, 0)) for n in args.dc]
    for cfg in configs:
        timed, base = ev.time(cfg)
        rows.append({"config": cfg.label(), "regime": "graphs", "floor_ms": 1000 * timed.best,
                     "median_ms": 1000 * timed.median, "spread": timed.spread,
                     "vs_graph_baseline": base.best / timed.best, "vs_eager": eager.best / timed.best})
        print(rows[-1], flush=True)
    ev.close()
    return rows


def run_p1(pipe, args, xl):
    from gpu_speed import p1_configs

    out = []
    for rounds in args.p1_rounds:
        ev = evaluator(pipe, args, "graphs", rounds=rounds)
        res = {}
        for name, cfg in p1_configs(args, xl).items():
            a = [ev.time(cfg) for _ in range(2)]
            sa, sb = (b.best / t.best for t, b in a)
            res[name] = {"A": sa, "B": sb, "rel_diff": abs(sa - sb) / ((sa + sb) / 2),
                         "time_ms": [1000 * t.best for t, _ in a]}
        ev.close()
        out.append({"rounds": rounds, "speedups": res})
        print(out[-1], flush=True)
    return out


def run_memory(pipe, args, xl):
    cfg = Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, 2 if xl else 1), tgate=TGate(3, 2, 1, 1))
    samples = []
    for cycle in range(args.cycles):
        with Accelerated(pipe, cfg, exec="graphs") as fast:
            call(fast, 6, 1, args.guidance)
        if cycle in (4, args.cycles - 1):
            gc.collect()
            torch.cuda.synchronize()
            samples.append({"cycle": cycle + 1, "allocated": torch.cuda.memory_allocated(),
                            "reserved": torch.cuda.memory_reserved()})
    return {"cycles": args.cycles, "samples": samples,
            "allocated_growth": samples[-1]["allocated"] - samples[0]["allocated"]}


def run_overhead(pipe, args, xl):
    """Capture and warm-up cost of one scored trial at ``--overhead-prompts`` prompts."""
    gate = min(10, args.steps - 1)
    cfg = Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, 2 if xl else 1), tgate=TGate(gate, 5, 1, 2))
    ev = evaluator(pipe, args, "graphs", prompts=args.overhead_prompts)
    ev.time(Config())  # the baseline's graphs exist before trials in a study
    ev.captures, ev.capture_seconds = 0, 0.0
    torch.cuda.synchronize()
    start = time.perf_counter()
    ev.measure(cfg)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    ev.close()
    return {"prompts": args.overhead_prompts, "config": cfg.label(), "trial_s": wall, "captures": ev.captures,
            "capture_s": ev.capture_seconds, "capture_fraction": ev.capture_seconds / wall}


def run_compile(pipe, args, xl):
    with torch.no_grad():
        ref = call(pipe, args.steps, args.batch, args.guidance)
    start = time.perf_counter()
    blocks = compile_blocks(pipe.unet)
    ev = evaluator(pipe, args, "compile")
    first = time.perf_counter()
    timed, base = ev.time(Config())  # first call compiles
    compile_s = time.perf_counter() - start
    eager = ev.time_eager(args.calls)
    print(f"  compiled in {compile_s:.0f} s; baseline {eager.best / timed.best:.2f}x vs eager", flush=True)
    rows = {"blocks": blocks, "compile_and_first_measure_s": compile_s, "baseline_floor_ms": 1000 * timed.best,
            "baseline_vs_eager": eager.best / timed.best, "eager_floor_ms": 1000 * eager.best}
    with ev._untouched() as p:
        got = call(p, args.steps, args.batch, args.guidance)
    rows["baseline_max_diff_vs_eager"] = float(np.abs(got - ref).max())
    gate = min(10, args.steps - 2)
    configs = {f"dc{n}": Config(deepcache=DeepCache(n, 0)) for n in args.dc}
    configs.update({"tome0.5": Config(tome=ToMe(0.5, 2 if xl else 1)), f"tgate{gate}": Config(tgate=TGate(gate, 5, 1, 2)),
                    "dc5+tome+tgate": Config(deepcache=DeepCache(5, 0), tome=ToMe(0.5, 2 if xl else 1), tgate=TGate(gate, 5, 1, 2))})
    for name, cfg in configs.items():
        try:
            t, b = ev.time(cfg)
            rows[f"{name}_vs_eager"] = eager.best / t.best
            rows[f"{name}_vs_compiled_baseline"] = b.best / t.best
            print(f"  compile+graphs {name}: {eager.best / t.best:.2f}x vs eager, {b.best / t.best:.2f}x vs compiled baseline "
                  f"({time.perf_counter() - first:.0f} s)", flush=True)
        except Exception as exc:
            rows[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
    rows["first_measure_s"] = time.perf_counter() - first
    ev.close()
    return rows


def _cuda_ms(fn, n=5) -> float:
    """Median of ``n`` timed calls after one warm-up, between CUDA events (eager)."""
    fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


@torch.no_grad()
def run_breakdown(pipe, args, xl):
    """Where an eager call's time goes outside the denoising loop: prompt encoding (eager and replayed
    from graphs) and the VAE decode, alone and as the pipeline runs it (SDXL's VAE config says
    ``force_upcast``: the pipeline casts the VAE to fp32 around the decode)."""
    size, sample, device = native_size(pipe), pipe.unet.config.sample_size, pipe.device
    lat = torch.randn(args.batch, pipe.unet.config.in_channels, sample, sample, device=device, dtype=torch.float16)
    upcast = bool(getattr(pipe.vae.config, "force_upcast", False))

    def encode():
        return pipe.encode_prompt(prompt=PROMPT, device=device, num_images_per_prompt=args.batch,
                                  do_classifier_free_guidance=True, negative_prompt="")

    def decode(fp32=False, cast=False):  # cast: the VAE to fp32 and back around it, as SDXL pipelines do
        if cast:
            pipe.vae.to(torch.float32)
        out = pipe.vae.decode((lat.float() if fp32 else lat) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        if cast:
            pipe.vae.to(torch.float16)
        return out

    rows = {"encode_prompt_ms": _cuda_ms(encode), "vae_force_upcast": upcast, "vae_decode_fp16_ms": _cuda_ms(decode)}
    if upcast:
        pipe.vae.to(torch.float32)
        rows["vae_decode_fp32_ms"] = _cuda_ms(lambda: decode(fp32=True))
        pipe.vae.to(torch.float16)
    emb = encode()
    cond = torch.cat([emb[1], emb[0]])
    x = torch.cat([lat] * 2)
    kw = {}
    if xl:
        pooled = torch.cat([emb[3], emb[2]])
        ids = torch.tensor([[size, size, 0, 0, size, size]] * x.shape[0], device=device, dtype=torch.float16)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    t = torch.tensor(500, device=device)
    rows["unet_step_eager_ms"] = _cuda_ms(lambda: pipe.unet(x, t, cond, **kw), n=10)
    rows["decode_as_pipeline_eager_ms"] = _cuda_ms(lambda: decode(fp32=upcast and xl, cast=upcast and xl))
    graphs = PipelineGraphs(pipe)
    with graphs.installed():  # the text encoders replayed from graphs (optimize.runtime.graphs)
        rows["encode_prompt_graphs_ms"] = _cuda_ms(encode)
        got = encode()
    graphs.close()
    rows["graphed_encode_equal"] = all(bool(torch.equal(a, b)) for a, b in zip(got, emb) if a is not None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipe", default="sd1.5")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--equal", default="20x1,50x1,20x4", help="steps x batch settings for the equality check")
    ap.add_argument("--dc", default="3,5,10", help="DeepCache intervals (branch 0) for e2e and compile")
    ap.add_argument("--p1-rounds", default="3")
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--overhead-prompts", type=int, default=32)
    ap.add_argument("--parts", default="equal,e2e,p1,memory,overhead")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--vae-fp16", action="store_true",
                    help="decode in fp16 (force_upcast off), as with the fp16-safe SDXL VAE users deploy")
    args = ap.parse_args()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s): {', '.join(unknown)} (known: {', '.join(PARTS)})")
    if not torch.cuda.is_available():
        sys.exit("gpu_graphs.py needs a CUDA device")
    args.equal = [tuple(int(v) for v in s.split("x")) for s in args.equal.split(",") if s]
    args.dc = [int(x) for x in args.dc.split(",") if x]
    args.p1_rounds = [int(x) for x in args.p1_rounds.split(",")]
    t = time.perf_counter()
    pipe = load_pipeline(resolve_pipe(args.pipe, random_weights=True), "ddim", "cuda", "fp16")
    pipe.set_progress_bar_config(disable=True)
    if args.vae_fp16:
        pipe.vae.register_to_config(force_upcast=False)
    xl = is_xl(pipe)
    args.guidance = args.guidance or default_guidance(xl)
    result = {"meta": {"pipe": args.pipe, "random_weights": True, "device": torch.cuda.get_device_name(),
                       "date": dt.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps,
                       "batch": args.batch, "calls": args.calls, "vae_fp16": args.vae_fp16, "build_s": time.perf_counter() - t,
                       "command": " ".join(sys.argv)}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.pipe}-graphs" + (f"-{args.tag}" if args.tag else "") + ".json")
    runners = {"equal": run_equal, "e2e": run_e2e, "p1": run_p1, "memory": run_memory, "overhead": run_overhead,
               "compile": run_compile, "breakdown": run_breakdown}
    for part in parts:
        print("==", part, flush=True)
        t = time.perf_counter()
        try:
            result[part] = runners[part](pipe, args, xl)
        except Exception as exc:
            traceback.print_exc()
            result[part] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result.setdefault("part_s", {})[part] = time.perf_counter() - t
        atomic_write(path, json.dumps(result, indent=1, default=str))
    summary(result)


def summary(result) -> None:
    m = result["meta"]
    print(f"\n{m['pipe']} (random weights) on {m['device']}, {m['date']}, {m['steps']} steps, batch {m['batch']}")
    if isinstance(result.get("equal"), list):
        rows = result["equal"]
        bad = [r for r in rows if r["error"] or not r.get("equal")]
        print(f"equal: {len(rows) - len(bad)} of {len(rows)} graphed runs bit-identical to eager")
        for r in bad:
            print(f"  {r['config']} {r['steps']}x{r['batch']}: {r['error'] or 'max diff %.3g (eager vs eager %.3g)' % (r['max_diff'], r['eager_self_diff'])}")
    for r in result.get("e2e", []) if isinstance(result.get("e2e"), list) else []:
        print(f"  e2e {r['regime']:6s} {r['config']:12s} floor {r['floor_ms']:7.1f} ms  {r['vs_eager']:5.2f}x vs eager baseline"
              + (f"  {r['vs_graph_baseline']:5.2f}x vs graphs baseline" if "vs_graph_baseline" in r else ""))
    for p1 in result.get("p1", []) if isinstance(result.get("p1"), list) else []:
        for name, row in p1["speedups"].items():
            print(f"  P1 graphs {p1['rounds']} rounds {name:16s} A {row['A']:.4f} B {row['B']:.4f} diff {100 * row['rel_diff']:.2f}%")
    for part in ("memory", "overhead", "compile", "breakdown"):
        if part in result:
            print(f"  {part}: {json.dumps(result[part], default=str)[:400]}")


if __name__ == "__main__":
    main()
