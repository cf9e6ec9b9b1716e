"""Speed on a GPU with full-size random-weight pipelines: latency landscape, timing precision (P1),
harness overhead (P2), leaks and crash checks, in one run.

    python benchmarks/gpu_speed.py --pipe sd1.5 --out benchmarks/results          # GPU
    python benchmarks/gpu_speed.py --pipe tiny --steps 12 --quick --out /tmp/r     # CPU smoke test

The landscape and P1 (``p1opt``) time through the optimizer's own protocol (``optimize.measure.evaluator``):
per configuration apply, one untimed warm-up call, then ``--calls`` paired rounds of one baseline call
and one configured call; speedup = baseline floor / configured floor (the floor: per step, the fastest
time seen across the rounds, summed; CUDA events cut every call at each UNet call). Rows also give
the speedup from the fastest whole calls and the calls' spread.

P1: baseline, DeepCache N=3 and DC5+ToMe+T-GATE, each measured twice (A, B) in one process; the table
shows how far the two measurements' speedups are apart. ``precision`` is the older protocol (apply,
warm-up, timed calls, remove, in interleaved rounds) kept for comparison.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optimize.levers import Config, DeepCache, TGate, ToMe, accelerate  # noqa: E402
from optimize.measure.evaluator import Timing  # noqa: E402
from optimize.runtime.pipelines import default_guidance, is_xl, load_pipeline, resolve_pipe  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402

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
    t = Timing.from_samples(times)
    return {"median": t.median, "min": t.fastest, "iqr_rel": t.spread, "n": len(times)}


def p1_configs(args, xl: bool) -> dict[str, Config]:
    """The P1 configurations: baseline, DeepCache N=3 and a three-method combination."""
    return {"baseline": Config(), "dc3": Config(deepcache=DeepCache(3, 0)), "dc5+tome+tgate": three_methods(args, xl, 5)}


def three_methods(args, xl: bool, interval: int) -> Config:
    return Config(deepcache=DeepCache(interval, 0), tome=ToMe(0.5, 2 if xl else 1),
                  tgate=TGate(min(10, args.steps - 1), 5, 1, 2))


def landscape_configs(steps: int, xl: bool, quick: bool) -> list[Config]:
    md = (2, 4) if xl else (1, 2)
    gates = [g for g in (5, 10, 20) if g < steps] or [max(2, steps // 2)]  # short CPU runs: one gate

    def tgate(g: int) -> TGate:
        return TGate(g, 5, 1, min(2, g - 1))  # sp 5, fi 1, warm-up 2 (less where the gate comes sooner)

    configs = [Config(deepcache=DeepCache(n, b)) for n in range(1, 11) for b in range(4)]
    configs += [Config(tome=ToMe(r, m)) for r in (0.3, 0.5, 0.7) for m in md]
    configs += [Config(tgate=tgate(g)) for g in gates]
    g = gates[min(1, len(gates) - 1)]
    configs += [
        Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, md[0])),
        Config(deepcache=DeepCache(3, 0), tgate=tgate(g)),
        Config(tome=ToMe(0.5, md[0]), tgate=tgate(g)),
        Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, md[0]), tgate=tgate(g)),
        Config(deepcache=DeepCache(5, 0), tome=ToMe(0.5, md[0]), tgate=tgate(g)),
        Config(deepcache=DeepCache(5, 0), tgate=tgate(g)),
    ]
    if quick:
        configs = [c for c in configs if not c.deepcache or (c.deepcache.cache_interval in (2, 3, 5, 10)
                                                           and c.deepcache.cache_branch_id < 2)]
        configs = [c for c in configs if not (c.tome and not c.deepcache and c.tome.ratio != 0.5)]
    return configs


def evaluator(pipe, args, prompts: int = 1, rounds: int | None = None):
    from optimize.measure.evaluator import Evaluator, GenerationSettings
    from optimize.measure.metrics import ClipScorer
    from optimize.measure.prompts import load_prompts

    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    settings = GenerationSettings(args.steps, args.guidance, size, size, args.batch, 42)
    scorer = ClipScorer("tiny-clip", None, device=str(pipe.device))  # scoring is not what is measured here
    return Evaluator(pipe, scorer, load_prompts("builtin", max(prompts, args.batch)), settings,
                     repeats=args.calls if rounds is None else rounds, exec=args.exec)


def timing_row(timed, base) -> dict:
    ratios = [b / c for b, c in zip(base.samples, timed.samples)]
    return {"speedup": base.best / timed.best, "time": timed.best, "baseline_time": base.best,
            "speedup_fastest_call": base.fastest / timed.fastest, "median_ratio": statistics.median(ratios),
            "median": timed.median, "iqr_rel": timed.spread, "baseline_iqr_rel": base.spread, "n": len(timed.samples)}


NOT_MEASURED = "not measured: --deadline-s reached"
LANDSCAPE_FIELDS = ["config", "speedup", "time", "baseline_time", "speedup_fastest_call", "median_ratio", "median",
                    "iqr_rel", "baseline_iqr_rel", "n", "params", "error"]


def run_landscape(pipe, args, xl: bool, csv_path: str) -> list[dict]:
    """Every configuration of the grid through ``Evaluator.time`` (paired rounds, floors); the CSV is
    rewritten after each one, so a run cut short keeps what it measured."""
    ev = evaluator(pipe, args)
    try:
        return _landscape_rows(ev, args, xl, csv_path)
    finally:
        ev.close()  # frees the baseline's graphs in graph modes


def _landscape_rows(ev, args, xl: bool, csv_path: str) -> list[dict]:
    rows = []
    for cfg in landscape_configs(args.steps, xl, args.quick):
        if args.match and not re.search(args.match, cfg.label()):
            continue
        row = {"config": cfg.label(), "params": json.dumps(cfg.to_params()), "error": ""}
        if time.perf_counter() > args.deadline:
            row["error"] = NOT_MEASURED
        else:
            try:
                row.update(timing_row(*ev.time(cfg)))
            except Exception as e:  # noqa: BLE001 - a crashing combination is a result, not the end of the run
                row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        if "speedup" in row:
            print(f"  {row['config']:45s} {1000 * row['time']:8.1f} ms  {row['speedup']:5.2f}x  "
                  f"(fastest calls {row['speedup_fastest_call']:5.2f}x, iqr {100 * row['iqr_rel']:.0f}%)", flush=True)
        else:
            print(f"  {row['config']:45s} {row['error']}", flush=True)
        _write_csv(csv_path, rows)
    return rows


def _write_csv(path: str, rows: list[dict]) -> None:
    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=LANDSCAPE_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, write)


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
                        cfg = Config(deepcache=dc, tome=tome, tgate=tg)
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


def run_optimizer_precision(pipe, args, xl: bool, rounds: int) -> dict:
    """P1 through the optimizer's own protocol (``Evaluator.measure``, as a study's trials are timed):
    baseline, DC3 and a three-method combination, each measured twice in one run."""
    ev = evaluator(pipe, args, args.p1_prompts, rounds)
    configs = p1_configs(args, xl)
    runs = {}
    for run in ("A", "B"):
        runs[run] = {}
        for k, c in configs.items():
            m = ev.measure(c)
            row = timing_row(m.timing, m.reference)
            row.update(samples=m.timing.samples, baseline_samples=m.reference.samples,
                       segments=_ms(m.timing.segments), baseline_segments=_ms(m.reference.segments))
            runs[run][k] = row
            print(f"  {run} {k:16s} {row['speedup']:.4f}x  {1000 * row['time']:.1f} ms  base {1000 * row['baseline_time']:.1f} ms"
                  f"  (fastest calls {row['speedup_fastest_call']:.4f}x)", flush=True)
    table = {}
    for k in configs:
        a, b = runs["A"][k], runs["B"][k]
        table[k] = {"A": a["speedup"], "B": b["speedup"], "rel_diff": rel_diff(a["speedup"], b["speedup"]),
                    "fastest_call_rel_diff": rel_diff(a["speedup_fastest_call"], b["speedup_fastest_call"]),
                    "median_ratio_rel_diff": rel_diff(a["median_ratio"], b["median_ratio"])}
    return {"runs": runs, "speedups": table, "prompts": args.p1_prompts, "rounds": rounds}


def run_p1(pipe, args, xl: bool, result: dict, stem: str) -> list[dict]:
    """P1 at each of ``--p1-rounds``, saved after each (a run cut short keeps the finished ones)."""
    done = result.setdefault("p1opt", [])
    for rounds in args.p1_rounds:
        print(f"p1opt, {rounds} rounds", flush=True)
        done.append(run_optimizer_precision(pipe, args, xl, rounds))
        _save(stem, result)
    return done


def _ms(segments):
    return [[round(1000 * x, 3) for x in call] for call in segments] if segments else None


def run_precision(pipe, args, xl: bool) -> dict:
    configs = p1_configs(args, xl)
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


def allocated_bytes(pipe) -> int:
    """Bytes held by tensors: the CUDA allocator's count on a GPU; elsewhere the sum over the live
    tensors the garbage collector tracks (parameters included), so a leak of tensors shows on CPU too."""
    if pipe.device.type == "cuda":
        return torch.cuda.memory_allocated()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch objects warns
        return sum(o.nelement() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor))


def run_leaks(pipe, args, xl: bool) -> dict:
    steps = 6
    cfg = Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, 2 if xl else 1), tgate=TGate(3, 2, 1, 1))
    samples = []
    for cycle in range(args.cycles):
        with accelerate(pipe, cfg) as fast:
            fast(prompt=[PROMPT], num_inference_steps=steps, guidance_scale=args.guidance, output_type="np")
        if cycle in (4, args.cycles - 1):
            gc.collect()
            samples.append({"cycle": cycle + 1, "allocated_bytes": allocated_bytes(pipe), "objects": len(gc.get_objects())})
    return {"cycles": args.cycles, "samples": samples,
            "allocated_growth": samples[-1]["allocated_bytes"] - samples[0]["allocated_bytes"],
            "object_growth": samples[-1]["objects"] - samples[0]["objects"]}


def run_overhead(pipe, args, xl: bool) -> dict:
    """Harness cost of one trial at ``--overhead-prompts`` prompts: apply + remove + CLIP scoring +
    PSNR/SSIM against the baseline images + storage, against the generation time of the trial's
    scoring pass alone (its paired timing rounds would only make the fraction smaller)."""
    import optuna

    from optimize.measure.metrics import ClipScorer, FidelityScorer
    from optimize.study.record import record_constraints

    cfg = three_methods(args, xl, 3)
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
    # fidelity costs the same whatever the pixels: the baseline images here are the same images rolled by one
    fidelity = FidelityScorer(images[1:n] + images[:1], device=str(pipe.device))
    fidelity.score(images[:n])  # warm-up: the first call pays for kernels and the allocator
    sync(pipe)
    t = time.perf_counter()
    fid = fidelity.score(images[:n])
    sync(pipe)
    fidelity_s = time.perf_counter() - t
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = os.path.join(args.tmp, "overhead.db")
    study = optuna.create_study(storage=f"sqlite:///{db}", direction="maximize")
    t = time.perf_counter()
    trial = study.ask()
    trial.suggest_categorical("deepcache", [False, True])
    for k, v in {"speedup": 2.0, "score_loss": 0.01, "time_per_image": 0.5, "spread": 0.01, "clip_score": 30.0,
                 "baseline_time": 1.0, "baseline_spread": 0.01, "time_median": 0.5, **fid}.items():
        trial.set_user_attr(k, v)
    record_constraints(trial, [-0.01])
    study.tell(trial, 2.0)
    store_s = time.perf_counter() - t
    harness = apply_s + remove_s + score_s + fidelity_s + store_s
    return {"prompts": n, "generate_s": gen_s, "apply_s": apply_s, "remove_s": remove_s, "score_s": score_s,
            "fidelity_s": fidelity_s, "storage_s": store_s, "scorer_load_s_once_per_study": load_s,
            "harness_fraction": harness / (harness + gen_s)}


PARTS = ("landscape", "p1opt", "leaks", "overhead", "crashes", "precision")


def _save(stem: str, result: dict) -> None:
    atomic_write(stem + ".json", lambda f: json.dump(result, f, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipe", default="sd1.5", help="sd1.5, sd2.1, sdxl (random weights) or tiny/tiny-xl")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--calls", type=int, default=3,
                    help="paired rounds per landscape configuration (and timed calls per configuration for crashes/precision)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per run of the older precision protocol")
    ap.add_argument("--cycles", type=int, default=100, help="apply/remove cycles for the leak check")
    ap.add_argument("--overhead-prompts", type=int, default=32)
    ap.add_argument("--clip-model", default="ViT-g-14")
    ap.add_argument("--parts", default="landscape,p1opt,leaks,overhead",
                    help="comma list, run in this order: landscape, p1opt, leaks, overhead, crashes, precision")
    ap.add_argument("--quick", action="store_true", help="a smaller landscape grid (DeepCache N 2,3,5,10 x branch 0,1)")
    ap.add_argument("--crash-steps", default="25,20,50", help="step counts for the crash check (first: all combinations)")
    ap.add_argument("--p1-prompts", type=int, default=8)
    ap.add_argument("--p1-rounds", default=None, help="comma list of paired rounds for p1opt (default: --calls)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="added to the output files' names")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop measuring landscape configurations after this many seconds (the rest are listed as not measured)")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--match", default=None, help="landscape: only the configurations whose label matches this regex")
    ap.add_argument("--exec", default="eager", choices=("eager", "graphs", "compile"),
                    help="the execution mode of the landscape and p1opt parts (baseline and configurations alike)")
    args = ap.parse_args()
    args.crash_steps = [int(x) for x in args.crash_steps.split(",")]
    args.p1_rounds = [int(x) for x in (args.p1_rounds or str(args.calls)).split(",")]
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:  # before anything loads
        sys.exit(f"unknown part(s): {', '.join(unknown)} (known: {', '.join(PARTS)})")
    args.deadline = time.perf_counter() + args.deadline_s if args.deadline_s is not None else float("inf")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.pipe.startswith("tiny")
    spec = resolve_pipe(args.pipe, random_weights=not tiny)
    t = time.perf_counter()
    pipe = load_pipeline(spec, "ddim", device, "fp16" if device == "cuda" else "fp32")
    build_s = time.perf_counter() - t
    xl = is_xl(pipe)
    args.guidance = args.guidance or default_guidance(xl)
    if tiny:
        args.clip_model = "tiny-clip"
    meta = {
        "pipe": args.pipe, "random_weights": not tiny, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "date": dt.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps, "batch": args.batch,
        "guidance": args.guidance, "calls": args.calls, "build_s": build_s, "command": " ".join(sys.argv),
        "size": int(pipe.unet.config.sample_size * pipe.vae_scale_factor), "exec": args.exec,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.pipe}-{args.steps}steps-bs{args.batch}" + (f"-{args.tag}" if args.tag else ""))
    result = {"meta": meta}
    runners = {
        "landscape": lambda: run_landscape(pipe, args, xl, stem + "-landscape.csv"),
        "crashes": lambda: run_crashes(pipe, args, xl),
        "p1opt": lambda: run_p1(pipe, args, xl, result, stem),
        "precision": lambda: run_precision(pipe, args, xl),
        "leaks": lambda: run_leaks(pipe, args, xl),
        "overhead": lambda: run_overhead(pipe, args, xl),
    }
    for part in parts:  # in the order given; results are saved after each
        print(part, flush=True)
        result[part] = runners[part]()
        _save(stem, result)

    print(f"\n{meta['pipe']} on {meta['device']}, {args.steps} steps, batch {args.batch}, {meta['date']}")
    if "landscape" in result:
        done = [r for r in result["landscape"] if "speedup" in r]
        base = statistics.median(r["baseline_time"] for r in done) if done else float("nan")
        print(f"landscape: {len(done)} of {len(result['landscape'])} configurations measured; "
              f"baseline floor {1000 * base:.1f} ms/image (median over rows); fastest:")
        for r in sorted(done, key=lambda r: -r["speedup"])[:8]:
            print(f"  {r['config']:45s} {r['speedup']:5.2f}x  iqr {100 * r['iqr_rel']:.1f}%")
        errors = [r for r in result["landscape"] if r["error"] and r["error"] != NOT_MEASURED]
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
    for p1 in result.get("p1opt", []):
        for name, row in p1["speedups"].items():
            print(f"P1 {p1['rounds']:2d} rounds {name:16s} A {row['A']:.4f} B {row['B']:.4f} diff {100 * row['rel_diff']:.2f}%"
                  f" | fastest calls: diff {100 * row['fastest_call_rel_diff']:.2f}%"
                  f" | median of round ratios: diff {100 * row['median_ratio_rel_diff']:.2f}%")
    if "leaks" in result:
        lk = result["leaks"]
        print(f"leaks over {lk['cycles']} cycles: allocated {lk['allocated_growth']:+d} B, objects {lk['object_growth']:+d}")
    if "overhead" in result:
        o = result["overhead"]
        print(f"P2 overhead at {o['prompts']} prompts: {100 * o['harness_fraction']:.2f}% (apply {o['apply_s']:.3f}s, remove {o['remove_s']:.3f}s, "
              f"score {o['score_s']:.3f}s, psnr/ssim {o['fidelity_s']:.3f}s, storage {o['storage_s']:.3f}s, generate {o['generate_s']:.1f}s)")


if __name__ == "__main__":
    main()
