"""Speed on a GPU with full-size random-weight pipelines: latency landscape, timing precision (P1),
harness overhead (P2) and leaks, in one run.

    python benchmarks/gpu_speed.py --pipe sd1.5 --out benchmarks/results          # GPU, ~7 min
    python benchmarks/gpu_speed.py --pipe tiny --steps 12 --quick --out /tmp/r     # CPU smoke test

Protocol for every timed configuration: apply, one untimed warm-up call, ``--calls`` timed calls
(device synchronized around each; CUDA events give the same numbers), remove. The landscape
re-measures the baseline every ``--baseline-every`` configurations and divides each configuration's
median by the mean of the two baseline medians around it, to cancel drift.

P1 (precision): two independent measurement runs, each of ``--rounds`` interleaved rounds of
(baseline, DC3, DC5+ToMe+T-GATE); speedup per run from the medians (and from the minima) of all
calls; the table shows how far the two runs' speedups are apart.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optimize.accelerators import Config, DeepCache, TGate, ToMe, accelerate  # noqa: E402
from optimize.pipelines import load_pipeline, resolve_pipe  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def sync(pipe) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def one_call(fn, pipe, steps: int, batch: int, guidance: float, seed: int = 42) -> float:
    sync(pipe)
    start = time.perf_counter()
    fn(prompt=[PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
       generator=torch.Generator("cpu").manual_seed(seed))
    sync(pipe)
    return time.perf_counter() - start


def time_config(pipe, cfg: Config, calls: int, steps: int, batch: int, guidance: float) -> list[float]:
    with accelerate(pipe, cfg) as fast:
        one_call(fast, pipe, steps, batch, guidance)  # warm-up
        return [one_call(fast, pipe, steps, batch, guidance) / batch for _ in range(calls)]


def rel_diff(a: float, b: float) -> float:
    """How far two measurements of one thing are apart, relative to their mean (the P1 figure)."""
    return abs(a - b) / ((a + b) / 2)


def summarize(times: list[float]) -> dict:
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {"median": float(med), "min": float(min(times)), "iqr_rel": float((q3 - q1) / med), "n": len(times)}


def landscape_configs(steps: int, xl: bool, quick: bool) -> list[Config]:
    md = (2, 4) if xl else (1, 2)
    gates = [g for g in (5, 10, 20) if g < steps]
    configs = [Config(deepcache=DeepCache(n, b)) for n in range(1, 11) for b in range(4)]
    configs += [Config(tome=ToMe(r, m)) for r in (0.3, 0.5, 0.7) for m in md]
    configs += [Config(tgate=TGate(g, 5, 1, 2)) for g in gates]
    g = gates[min(1, len(gates) - 1)]
    configs += [
        Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, md[0])),
        Config(deepcache=DeepCache(3, 0), tgate=TGate(g, 5, 1, 2)),
        Config(tome=ToMe(0.5, md[0]), tgate=TGate(g, 5, 1, 2)),
        Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, md[0]), tgate=TGate(g, 5, 1, 2)),
        Config(deepcache=DeepCache(5, 0), tome=ToMe(0.5, md[0]), tgate=TGate(g, 5, 1, 2)),
        Config(deepcache=DeepCache(5, 0), tgate=TGate(g, 5, 1, 2)),
    ]
    if quick:
        configs = [c for c in configs if not c.deepcache or (c.deepcache.cache_interval in (2, 3, 5, 10)
                                                           and c.deepcache.cache_branch_id < 2)]
        configs = [c for c in configs if not (c.tome and not c.deepcache and c.tome.ratio != 0.5)]
    return configs


def run_landscape(pipe, args, xl: bool) -> list[dict]:
    configs = landscape_configs(args.steps, xl, args.quick)
    rows, pending = [], []
    base_prev = summarize(time_config(pipe, Config(), args.calls, args.steps, args.batch, args.guidance))
    baselines = [base_prev]

    def flush(base_next):
        for row in pending:
            ref = (base_prev["median"] + base_next["median"]) / 2
            row["baseline_median"] = ref
            row["speedup"] = ref / row["median"]
            rows.append(row)
        pending.clear()

    for i, cfg in enumerate(configs):
        try:
            row = summarize(time_config(pipe, cfg, args.calls, args.steps, args.batch, args.guidance))
            row["error"] = ""
        except Exception as e:  # noqa: BLE001 - a crashing combination is a result, not the end of the run
            row = {"median": float("nan"), "min": float("nan"), "iqr_rel": float("nan"), "n": 0,
                   "error": f"{type(e).__name__}: {e}"[:200]}
        row.update(config=cfg.label(), params=json.dumps(cfg.to_params()))
        pending.append(row)
        print(f"  {cfg.label():45s} {1000 * row['median']:8.1f} ms  {row['error']}", flush=True)
        if (i + 1) % args.baseline_every == 0 or i == len(configs) - 1:
            base_next = summarize(time_config(pipe, Config(), args.calls, args.steps, args.batch, args.guidance))
            baselines.append(base_next)
            flush(base_next)
            base_prev = base_next
    spread = [b["median"] for b in baselines]
    rows.insert(0, {"config": "baseline", "params": "{}", "median": statistics.median(spread), "min": min(spread),
                    "iqr_rel": (max(spread) - min(spread)) / statistics.median(spread), "n": len(spread),
                    "error": "", "baseline_median": statistics.median(spread), "speedup": 1.0})
    return rows


def run_crashes(pipe, args, xl: bool) -> list[dict]:
    """Every method combination, two calls each (the crashes the libraries had came on the second
    call), at batch 1 and 4 and several step counts."""
    md = 2 if xl else 1
    rows = []
    for steps in args.crash_steps:
        for batch in (1, 4):
            for dc in (None, DeepCache(3, 0)):
                for tome in (None, ToMe(0.5, md)):
                    for tg in (None, TGate(10, 5, 1, 2)):
                        cfg = Config(dc, tome, tg)
                        if steps != args.crash_steps[0] and not (dc and tg):
                            continue  # other step counts: only the combinations that crashed before
                        try:
                            with accelerate(pipe, cfg) as fast:
                                for _ in range(2):
                                    one_call(fast, pipe, steps, batch, args.guidance)
                            error = ""
                        except Exception as e:  # noqa: BLE001
                            error = f"{type(e).__name__}: {e}"[:200]
                        rows.append({"config": cfg.label(), "steps": steps, "batch": batch, "error": error})
                        print(f"  crash check {cfg.label():45s} steps {steps} bs {batch}: {error or 'ok'}", flush=True)
    return rows


def run_optimizer_precision(pipe, args, xl: bool) -> dict:
    """P1 through the optimizer's own protocol (optimize.measure): baseline, DC3 and a three-method
    combination, each measured twice in one run, as a study's trials are: paired rounds of baseline and
    configured calls, speedup = fastest baseline call / fastest configured call."""
    from optimize.measure import Evaluator, GenerationSettings
    from optimize.metrics import ClipScorer
    from optimize.prompts import load_prompts

    md = 2 if xl else 1
    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    settings = GenerationSettings(args.steps, args.guidance, size, size, args.batch, 42)
    scorer = ClipScorer("tiny-clip", None, device=str(pipe.device))  # scoring is not what is measured here
    ev = Evaluator(pipe, scorer, load_prompts("builtin", args.p1_prompts), settings, repeats=args.calls)
    configs = {"baseline": Config(), "dc3": Config(deepcache=DeepCache(3, 0)),
               "dc5+tome+tgate": Config(deepcache=DeepCache(5, 0), tome=ToMe(0.5, md), tgate=TGate(min(10, args.steps - 1), 5, 1, 2))}
    runs = {}
    for run in ("A", "B"):
        runs[run] = {}
        for k, c in configs.items():
            m = ev.measure(c)
            ratios = [b / c for b, c in zip(m.reference.samples, m.timing.samples)]
            runs[run][k] = {"speedup": m.speedup, "time": m.timing.best, "baseline_time": m.reference.best,
                            "spread": m.timing.spread, "baseline_spread": m.reference.spread,
                            "median_ratio": statistics.median(ratios), "samples": m.timing.samples,
                            "baseline_samples": m.reference.samples}
            print(f"  {run} {k:16s} {m.speedup:.4f}x  {1000 * m.timing.best:.1f} ms  base {1000 * m.reference.best:.1f} ms",
                  flush=True)
    table = {}
    for k in configs:
        sa, sb = runs["A"][k]["speedup"], runs["B"][k]["speedup"]
        ra, rb = runs["A"][k]["median_ratio"], runs["B"][k]["median_ratio"]
        table[k] = {"A": sa, "B": sb, "rel_diff": rel_diff(sa, sb), "median_ratio_rel_diff": rel_diff(ra, rb)}
    return {"runs": runs, "speedups": table, "prompts": args.p1_prompts, "rounds": args.calls}


def run_precision(pipe, args, xl: bool) -> dict:
    md = 2 if xl else 1
    configs = {
        "baseline": Config(),
        "dc3": Config(deepcache=DeepCache(3, 0)),
        "dc5+tome+tgate": Config(deepcache=DeepCache(5, 0), tome=ToMe(0.5, md), tgate=TGate(min(10, args.steps - 1), 5, 1, 2)),
    }
    out = {}
    for run in ("A", "B"):
        times = {k: [] for k in configs}
        for _ in range(args.rounds):
            for name, cfg in configs.items():
                times[name] += time_config(pipe, cfg, args.calls, args.steps, args.batch, args.guidance)
        out[run] = {k: summarize(v) for k, v in times.items()}
    table = {}
    for name in configs:
        row = {}
        for stat in ("median", "min"):
            sa = out["A"]["baseline"][stat] / out["A"][name][stat]
            sb = out["B"]["baseline"][stat] / out["B"][name][stat]
            row[stat] = {"A": sa, "B": sb, "rel_diff": rel_diff(sa, sb)}
        # for the baseline itself: how far its two runs' times are apart
        row["time_rel_diff"] = abs(out["A"][name]["median"] - out["B"][name]["median"]) / out["A"][name]["median"]
        row["time_rel_diff_min"] = abs(out["A"][name]["min"] - out["B"][name]["min"]) / out["A"][name]["min"]
        table[name] = row
    return {"runs": out, "speedups": table}


def run_leaks(pipe, args, xl: bool) -> dict:
    steps = 6
    cfg = Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, 2 if xl else 1), tgate=TGate(3, 2, 1, 1))
    samples = []
    for cycle in range(args.cycles):
        with accelerate(pipe, cfg) as fast:
            fast(prompt=[PROMPT], num_inference_steps=steps, guidance_scale=args.guidance, output_type="np")
        if cycle in (4, args.cycles - 1):
            gc.collect()
            mem = torch.cuda.memory_allocated() if pipe.device.type == "cuda" else 0
            samples.append({"cycle": cycle + 1, "allocated_bytes": mem, "objects": len(gc.get_objects())})
    return {"cycles": args.cycles, "samples": samples,
            "allocated_growth": samples[-1]["allocated_bytes"] - samples[0]["allocated_bytes"],
            "object_growth": samples[-1]["objects"] - samples[0]["objects"]}


def run_overhead(pipe, args, xl: bool) -> dict:
    """Harness cost of one trial at ``--overhead-prompts`` prompts: apply + remove + CLIP scoring +
    storage, against the generation time of the same trial."""
    import optuna

    from optimize.metrics import ClipScorer
    from optimize.search import record_constraints

    cfg = Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, 2 if xl else 1), tgate=TGate(min(10, args.steps - 1), 5, 1, 2))
    n = args.overhead_prompts
    dtype = "fp16" if pipe.device.type == "cuda" else "fp32"
    t = time.perf_counter()
    scorer = ClipScorer(args.clip_model, None, device=str(pipe.device), dtype=dtype)
    load_s = time.perf_counter() - t
    t0 = time.perf_counter()
    acc = accelerate(pipe, cfg).apply()
    apply_s = time.perf_counter() - t0
    images, gen_s = [], 0.0
    for i in range(0, n, args.batch):
        sync(pipe)
        t = time.perf_counter()
        out = acc(prompt=[PROMPT] * args.batch, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  output_type="pil", generator=torch.Generator("cpu").manual_seed(i))
        sync(pipe)
        gen_s += time.perf_counter() - t
        images += out.images
    t = time.perf_counter()
    acc.remove()
    remove_s = time.perf_counter() - t
    scorer.score(images[:2], [PROMPT] * 2)  # warm the scorer like the study does after the baseline
    sync(pipe)
    t = time.perf_counter()
    scorer.score(images[:n], [PROMPT] * n)
    sync(pipe)
    score_s = time.perf_counter() - t
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = os.path.join(args.tmp, "overhead.db")
    study = optuna.create_study(storage=f"sqlite:///{db}", direction="maximize")
    t = time.perf_counter()
    trial = study.ask()
    trial.suggest_categorical("deepcache", [False, True])
    for k, v in {"speedup": 2.0, "score_loss": 0.01, "time_per_image": 0.5, "spread": 0.01, "clip_score": 30.0}.items():
        trial.set_user_attr(k, v)
    record_constraints(trial, [-0.01])
    study.tell(trial, 2.0)
    store_s = time.perf_counter() - t
    harness = apply_s + remove_s + score_s + store_s
    return {"prompts": n, "generate_s": gen_s, "apply_s": apply_s, "remove_s": remove_s, "score_s": score_s,
            "storage_s": store_s, "scorer_load_s_once_per_study": load_s,
            "harness_fraction": harness / (harness + gen_s)}


def _save(stem: str, result: dict) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipe", default="sd1.5", help="sd1.5, sd2.1, sdxl (random weights) or tiny/tiny-xl")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per configuration")
    ap.add_argument("--baseline-every", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per P1 run")
    ap.add_argument("--cycles", type=int, default=100, help="apply/remove cycles for the leak check")
    ap.add_argument("--overhead-prompts", type=int, default=32)
    ap.add_argument("--clip-model", default="ViT-g-14")
    ap.add_argument("--parts", default="landscape,precision,leaks,overhead",
                    help="comma list of landscape, precision, leaks, overhead, crashes, p1opt")
    ap.add_argument("--quick", action="store_true", help="a smaller landscape grid (DeepCache N 2,3,5,10 x branch 0,1)")
    ap.add_argument("--crash-steps", default="25,20,50", help="step counts for the crash check (first: all combinations)")
    ap.add_argument("--p1-prompts", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tmp", default="/tmp")
    args = ap.parse_args()
    args.crash_steps = [int(x) for x in args.crash_steps.split(",")]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.pipe.startswith("tiny")
    spec = resolve_pipe(args.pipe, random_weights=not tiny)
    t = time.perf_counter()
    pipe = load_pipeline(spec, "ddim", device, "fp16" if device == "cuda" else "fp32")
    build_s = time.perf_counter() - t
    xl = hasattr(pipe, "text_encoder_2")
    args.guidance = args.guidance or (5.0 if xl else 7.5)
    if tiny:
        args.clip_model = "tiny-clip"
    meta = {
        "pipe": args.pipe, "random_weights": not tiny, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "date": dt.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps, "batch": args.batch,
        "guidance": args.guidance, "calls": args.calls, "build_s": build_s, "command": " ".join(sys.argv),
        "size": int(pipe.unet.config.sample_size * pipe.vae_scale_factor),
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.pipe}-{args.steps}steps-bs{args.batch}")
    result = {"meta": meta}
    parts = args.parts.split(",")
    if "landscape" in parts:
        print("landscape", flush=True)
        rows = run_landscape(pipe, args, xl)
        result["landscape"] = rows
        with open(stem + "-landscape.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["config", "speedup", "median", "min", "iqr_rel", "n", "baseline_median", "params", "error"])
            w.writeheader()
            w.writerows(rows)
    if "crashes" in parts:
        print("crashes", flush=True)
        result["crashes"] = run_crashes(pipe, args, xl)
        _save(stem, result)
    if "p1opt" in parts:
        print("p1 through the optimizer's protocol", flush=True)
        result["p1opt"] = run_optimizer_precision(pipe, args, xl)
        _save(stem, result)
    if "precision" in parts:
        print("precision", flush=True)
        result["precision"] = run_precision(pipe, args, xl)
    if "leaks" in parts:
        print("leaks", flush=True)
        result["leaks"] = run_leaks(pipe, args, xl)
    if "overhead" in parts:
        print("overhead", flush=True)
        result["overhead"] = run_overhead(pipe, args, xl)
    _save(stem, result)

    print(f"\n{meta['pipe']} on {meta['device']}, {args.steps} steps, batch {args.batch}, {meta['date']}")
    if "landscape" in result:
        best = sorted((r for r in result["landscape"] if r["median"] == r["median"]), key=lambda r: -r["speedup"])[:8]
        print(f"baseline {1000 * result['landscape'][0]['median']:.1f} ms/image; fastest:")
        for r in best:
            print(f"  {r['config']:45s} {r['speedup']:5.2f}x  iqr {100 * r['iqr_rel']:.1f}%")
        errors = [r for r in result["landscape"] if r["error"]]
        print(f"  configurations that raised: {len(errors)}")
    if "precision" in result:
        for name, row in result["precision"]["speedups"].items():
            print(f"P1 {name:16s} median A {row['median']['A']:.3f} B {row['median']['B']:.3f} diff {100 * row['median']['rel_diff']:.2f}%"
                  f" | min diff {100 * row['min']['rel_diff']:.2f}% | time diff {100 * row['time_rel_diff']:.2f}%")
    if "crashes" in result:
        bad = [r for r in result["crashes"] if r["error"]]
        print(f"crash check: {len(result['crashes'])} runs of two calls, {len(bad)} raised")
        for r in bad:
            print(f"  {r['config']} steps {r['steps']} bs {r['batch']}: {r['error']}")
    if "p1opt" in result:
        for name, row in result["p1opt"]["speedups"].items():
            print(f"P1 (optimizer protocol, paired) {name:16s} A {row['A']:.4f} B {row['B']:.4f} diff {100 * row['rel_diff']:.2f}%"
                  f" | median of round ratios: diff {100 * row['median_ratio_rel_diff']:.2f}%")
    if "leaks" in result:
        lk = result["leaks"]
        print(f"leaks over {lk['cycles']} cycles: allocated {lk['allocated_growth']:+d} B, objects {lk['object_growth']:+d}")
    if "overhead" in result:
        o = result["overhead"]
        print(f"P2 overhead at {o['prompts']} prompts: {100 * o['harness_fraction']:.2f}% (apply {o['apply_s']:.3f}s, remove {o['remove_s']:.3f}s, "
              f"score {o['score_s']:.3f}s, storage {o['storage_s']:.3f}s, generate {o['generate_s']:.1f}s)")


if __name__ == "__main__":
    main()
