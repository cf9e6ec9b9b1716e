#!/usr/bin/env python
"""How many paired rounds a CPU speedup needs: the optimizer's own timing (``Evaluator.time``: warm-up,
then paired rounds of one untouched call and one configured call) on the trained testbed, eager.

    python benchmarks/cpu_timing.py --rounds 10 --counts 2,3,4,6,8,10 --out benchmarks/results/cpu-timing.json

Three things, each read at several round counts n (the first n rounds of one measurement, as P1 on
the GPU does):

* **baseline vs baseline**: the untouched pipeline paired with itself. The true speedup is 1; how far
  the floor ratio lands from it and whether its 90% interval holds 1 says what noise alone reads as.
* **the same configuration twice** (A, then B, minutes apart; P1): |A - B| / mean, and whether B's
  speedup falls inside A's interval (what a held-out re-measurement of a pick is checked against).
* **DeepCache N=3 vs N=5** in the same run: whether the order comes out right (N=5 skips more).

Each is read with the CPU's statistic (``geomean``: the ratio of the two sides' geometric means, the
mean paired log ratio) and with the GPU's (``floor``: per-step fastest times, summed). Every call,
its per-step times and the load average around each measurement are written to ``--out``;
``--summarize JSON`` prints the tables again from such a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from optimize.runtime import pipelines  # noqa: E402
from optimize.levers import Config, DeepCache  # noqa: E402
from optimize.measure import Evaluator, GenerationSettings, Timing, pin_cpu_threads  # noqa: E402
from optimize.measure.uncertainty import speedup_interval  # noqa: E402

LEVEL = 0.9
CONFIGS = {"baseline": Config(), "dc3": Config(deepcache=DeepCache(3, 0)), "dc5": Config(deepcache=DeepCache(5, 0))}


def measure(ev: Evaluator, name: str, rounds: int) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    timed, base = ev.time(CONFIGS[name])
    return {"config": name, "seconds": round(time.perf_counter() - start, 2), "load_before": load_before,
            "load_after": os.getloadavg()[0], "timed": timed.samples, "base": base.samples,
            "timed_segments": timed.segments, "base_segments": base.segments}


def at(m: dict, n: int, statistic: str = "geomean") -> dict:
    """The speedup of the first ``n`` rounds of measurement ``m``, as the optimizer computes it on a CPU
    (``geomean``), or from the per-step floors (``floor``, the GPU's statistic)."""
    timed = Timing.from_samples(m["timed"][:n], m["timed_segments"][:n], statistic)
    base = Timing.from_samples(m["base"][:n], m["base_segments"][:n], statistic)
    speedup = base.best / timed.best
    interval = speedup_interval(speedup, timed.samples, base.samples, True, LEVEL)
    ratios = [b / c for b, c in zip(base.samples, timed.samples)]
    return {"speedup": speedup, "interval": interval, "median_ratio": statistics.median(ratios),
            "base_ms": 1000 * base.best, "spread": timed.spread}


def table(runs: list[dict], counts: list[int], statistic: str) -> dict:
    out: dict = {"statistic": statistic, "baseline_vs_baseline": [], "p1": [], "order": []}
    at_ = lambda m, n: at(m, n, statistic)  # noqa: E731
    bb = [m for m in runs if m["config"] == "baseline"]
    for n in counts:
        rows = [at_(m, n) for m in bb]
        out["baseline_vs_baseline"].append({
            "rounds": n, "speedups": [r["speedup"] for r in rows], "intervals": [r["interval"] for r in rows],
            "worst_off_1": max(abs(math.log(r["speedup"])) for r in rows),
            "interval_holds_1": sum(r["interval"] is not None and r["interval"][0] <= 1 <= r["interval"][1] for r in rows),
            "of": len(rows)})
    for name in ("dc3", "dc5"):
        pair = [m for m in runs if m["config"] == name]
        if len(pair) < 2:
            continue
        for n in counts:
            a, b = at_(pair[0], n), at_(pair[1], n)
            out["p1"].append({"config": name, "rounds": n, "a": a["speedup"], "b": b["speedup"],
                              "a_interval": a["interval"], "b_interval": b["interval"],
                              "diff": abs(a["speedup"] - b["speedup"]) / ((a["speedup"] + b["speedup"]) / 2),
                              "b_in_a": a["interval"] is not None and a["interval"][0] <= b["speedup"] <= a["interval"][1],
                              "a_in_b": b["interval"] is not None and b["interval"][0] <= a["speedup"] <= b["interval"][1]})
    dc3, dc5 = [m for m in runs if m["config"] == "dc3"], [m for m in runs if m["config"] == "dc5"]
    for n in counts:
        pairs = [(at_(x, n)["speedup"], at_(y, n)["speedup"]) for x, y in zip(dc3, dc5)]
        out["order"].append({"rounds": n, "dc3_dc5": pairs, "dc5_faster": sum(y > x for x, y in pairs), "of": len(pairs)})
    return out


def show(summary: dict) -> None:
    fmt = lambda i: "-" if i is None else f"[{i[0]:.2f}, {i[1]:.2f}]"  # noqa: E731
    print(f"statistic: {summary['statistic']}")
    print("baseline vs baseline (true 1.00x):")
    for r in summary["baseline_vs_baseline"]:
        cells = ", ".join(f"{s:.2f}x {fmt(i)}" for s, i in zip(r["speedups"], r["intervals"]))
        print(f"  {r['rounds']:2d} rounds: {cells}; interval holds 1 in {r['interval_holds_1']}/{r['of']}")
    print("the same configuration twice (P1):")
    for r in summary["p1"]:
        print(f"  {r['config']} {r['rounds']:2d} rounds: A {r['a']:.2f}x {fmt(r['a_interval'])}, B {r['b']:.2f}x "
              f"{fmt(r['b_interval'])}: {100 * r['diff']:.1f}%, B in A's interval: {r['b_in_a']}")
    print("DeepCache N=5 faster than N=3:")
    for r in summary["order"]:
        print(f"  {r['rounds']:2d} rounds: {r['dc5_faster']}/{r['of']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=12, help="paired rounds per measurement")
    p.add_argument("--counts", default="2,3,4,6,8,12", help="round counts to read off (first n rounds)")
    p.add_argument("--baseline-repeats", type=int, default=3, help="baseline-vs-baseline measurements")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu-timing.json"))
    p.add_argument("--summarize", metavar="JSON", help="only print the tables of an earlier --out")
    args = p.parse_args()
    counts = [int(c) for c in args.counts.split(",") if int(c) <= args.rounds]
    if args.summarize:
        data = json.load(open(args.summarize))
        for statistic in ("geomean", "floor"):
            show(table(data["runs"], counts, statistic))
        return

    import torch

    pin_cpu_threads("cpu")  # as optimize-sd run times on a CPU
    pipe = pipelines.load_pipeline(pipelines.resolve_pipe("tiny"), "ddim", "cpu", "fp32")
    size = pipelines.native_size(pipe)
    settings = GenerationSettings(steps=args.steps, guidance=pipelines.default_guidance(False), height=size,
                                  width=size)
    ev = Evaluator(pipe, None, ["a red circle above a blue square"], settings, repeats=args.rounds)
    # A, then B of each configuration, with baseline-vs-baseline runs between: minutes apart, as P1
    order = ["dc3", "dc5", "baseline", "dc3", "dc5"] + ["baseline"] * (args.baseline_repeats - 1)
    runs = []
    start = time.perf_counter()
    for name in order:
        runs.append(measure(ev, name, args.rounds))
        r = at(runs[-1], args.rounds)
        print(f"{name}: {r['speedup']:.2f}x {r['interval']} baseline {r['base_ms']:.0f} ms/image, "
              f"{runs[-1]['seconds']:.0f} s, load {runs[-1]['load_before']:.2f}", flush=True)
    summary = {s: table(runs, counts, s) for s in ("geomean", "floor")}
    for s in summary.values():
        show(s)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "steps": args.steps, "size": size, "rounds": args.rounds,
            "exec": "eager", "level": LEVEL, "wall_s": round(time.perf_counter() - start, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f)
    print(f"wrote {args.out} ({meta['wall_s']} s)")


if __name__ == "__main__":
    main()
