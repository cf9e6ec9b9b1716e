#!/usr/bin/env python
"""The sampling schedule's landscape on the trained testbed: for each solver and step count, the CLIP
score loss, the PSNR against the reference's images and the speedup against the reference (DDIM,
``--steps`` steps), on held-out captions the search never sees, with the caching levers for scale.

Each configuration is measured as the optimizer measures a trial (:class:`optimize.measure.evaluator.Evaluator`,
eager): applied, one warm-up call, ``--rounds`` paired rounds of a reference call and a configured
call on the first caption (speedup = reference floor / configured floor, with the paired interval
of :mod:`optimize.measure.uncertainty`), then one pass over every caption whose images are scored. Seeds are
per caption, the same for every configuration. The UNet calls per image are counted too: on a shared
CPU that is the steadier measure of the work saved.

    python benchmarks/schedule_landscape.py --out benchmarks/results/schedule_landscape_cpu.json

``--picks`` measures, instead of the grid, the configurations that ``benchmarks/schedule_search.py``
runs picked (their labels), on as many held-out captions as asked: one larger held-out check of every
pick, on the same captions and seeds for all of them.

    python benchmarks/schedule_landscape.py --captions 128 --picks benchmarks/results/schedule_search_cpu.json \
        --out benchmarks/results/heldout_picks_cpu.json

``--configs`` measures given configurations instead (a JSON list of flat params, as a study stores
them), and ``--device``, ``--dtype``, ``--exec`` run the testbed where they say: the quality of the GPU
levers (precision, compile, layout) on a trained model, against the same pipeline untouched (fp16
graphs replay fp16 eager bit for bit):

    python benchmarks/schedule_landscape.py --device cuda --dtype fp16 --exec graphs --steps 20 --captions 128 \
        --configs '[{"compile": true}, {"compile": true, "precision": true, "precision.mode": "int8"}]' --out F
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optimize.levers import Config, DeepCache, Schedule, TGate, ToMe  # noqa: E402
from optimize.measure.evaluator import Evaluator, GenerationSettings  # noqa: E402
from optimize.measure.metrics import FidelityScorer, score_loss  # noqa: E402
from optimize.runtime.pipelines import load_pipeline, resolve_pipe  # noqa: E402
from optimize.measure.prompts import load_heldout  # noqa: E402
from optimize.measure.uncertainty import mean_interval, score_loss_interval, speedup_interval  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402


_LABELS = {  # a pick's label, as Config.label writes it, back to its lever's params
    "sched": lambda a: ("schedule", Schedule(solver=a[0], steps=int(a[1]))),
    "dc": lambda a: ("deepcache", DeepCache(int(a[0]), int(a[1].lstrip("b")))),
    "tome": lambda a: ("tome", ToMe(float(a[0]), int(a[1].lstrip("md")))),
    "tgate": lambda a: ("tgate", TGate(int(a[0]), int(a[1][2:]), int(a[2][2:]), int(a[3][1:]))),
}


def from_label(label: str) -> Config:
    """``sched(ddim,25)+tome(0.8,md8)`` -> the Config whose label it is (checked by writing it back)."""
    levers = dict(_LABELS[name](args.split(","))
                  for name, args in re.findall(r"(\w+)\(([^)]*)\)", label))
    config = Config(**levers)
    if config.label() != label:
        raise ValueError(f"cannot read the label {label!r} back (got {config.label()!r})")
    return config


def picks(paths):
    """The distinct configurations the studies in ``paths`` picked, each with who picked it."""
    by_label: dict[str, list[str]] = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        tag = "conf" if result["settings"].get("confidence") else "point"
        for row in result["rows"]:
            if row.get("config") and row["config"] != "baseline":
                by_label.setdefault(row["config"], []).append(f"{row['arm']} {row['seed']} ({tag})")
    return [(from_label(label), who) for label, who in by_label.items()]


def configurations(solvers, steps_list, reference_steps):
    out = [Config(deepcache=DeepCache(3, 0)), Config(deepcache=DeepCache(5, 0))]
    for solver in solvers:
        for steps in steps_list:
            if steps < reference_steps:
                out.append(Config(schedule=Schedule(solver, steps)))
    return out


def unet_calls(config: Config, steps: int) -> float:
    """UNet evaluations per image: the schedule's steps; DeepCache's partial steps count as the share of
    the UNet they run is not known here, so they count as calls too (its saving is in the timing)."""
    return config.schedule.steps if config.schedule else steps


def span(interval, fmt: str = ".2f") -> str:
    """An interval as text; one round (or one caption) has none."""
    return "[-]" if interval is None else f"[{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="the reference's DDIM steps")
    ap.add_argument("--captions", type=int, default=32, help="held-out captions scored per configuration")
    ap.add_argument("--rounds", type=int, default=5, help="paired timing rounds per configuration")
    ap.add_argument("--solvers", default="ddim,dpm++,dpm++karras,unipc,euler")
    ap.add_argument("--step-counts", default="10,15,20,25,30")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--level", type=float, default=0.9)
    ap.add_argument("--picks", nargs="+", default=None,
                    help="results of benchmarks/schedule_search.py: measure their picks instead of the grid")
    ap.add_argument("--max-loss", type=float, default=0.02, help="with --picks: the bound the picks are checked on")
    ap.add_argument("--configs", default=None, help="a JSON list of flat params: these instead of the grid")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--exec", dest="exec_mode", default="eager", help="eager, graphs (CUDA)")
    ap.add_argument("--score-batch", type=int, default=None, help="captions per call of the scoring pass")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_pipe("tiny"), "ddim", args.device, args.dtype)
    from optimize.measure.metrics import testbed_scorer

    scorer = testbed_scorer(args.device)
    # held out: the captions after the 8 a default tiny study searches on
    prompts = load_heldout("testbed", 8, args.captions)
    settings = GenerationSettings(steps=args.steps, guidance=7.5, height=64, width=64, seed=42)
    evaluator = Evaluator(pipe, scorer, prompts, settings, repeats=args.rounds, scored_repeats=args.rounds,
                          exec=args.exec_mode, score_batch=args.score_batch)
    t0 = time.time()
    reference = evaluator.measure(Config(), paired=False)
    fidelity = FidelityScorer(reference.images)
    rows = []

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write() -> None:  # after every configuration: a run stopped by a time limit keeps what it measured
        result = {"reference": f"ddim {args.steps}", "device": args.device, "dtype": args.dtype,
                  "exec": args.exec_mode, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                  "captions": len(prompts), "rounds": args.rounds,
                  "level": args.level, "reference_clip": reference.clip_score,
                  "reference_ms_per_image": 1000 * reference.timing.best, "threads": args.threads,
                  "seconds": time.time() - t0, "rows": rows}
        atomic_write(args.out, json.dumps(result, indent=1))

    write()

    if args.picks:
        chosen = picks(args.picks)
        configs, pickers = [c for c, _ in chosen], {c.label(): who for c, who in chosen}
    elif args.configs:
        configs, pickers = [Config.from_params(p) for p in json.loads(args.configs)], {}
    else:
        configs, pickers = configurations(args.solvers.split(","), [int(s) for s in args.step_counts.split(",")],
                                          args.steps), {}
    for i, config in enumerate(configs):
        try:
            m = evaluator.measure(config)
        except Exception as exc:  # noqa: BLE001 - recorded; the next configuration still runs
            rows.append({"config": config.label(), "params": config.to_params(), "error": f"{type(exc).__name__}: {exc}"[:400]})
            print(f"[{i + 1}/{len(configs)}] {config.label()}: {rows[-1]['error']}", flush=True)
            write()
            continue
        per = fidelity.per_image(m.images)
        speedup = m.reference.best / m.timing.best
        row = {
            "config": config.label(), "params": config.to_params(),
            "unet_calls_ratio": args.steps / unet_calls(config, args.steps),
            "speedup": speedup,
            "speedup_interval": speedup_interval(speedup, m.timing.samples, m.reference.samples, True, args.level),
            "score_loss": score_loss(reference.clip_score, m.clip_score),
            "score_loss_interval": score_loss_interval(reference.scores, m.scores, args.level),
            "psnr": float(per["psnr"].mean()), "psnr_interval": mean_interval(per["psnr"], args.level),
            "ssim": float(per["ssim"].mean()),
            "spread": m.timing.spread, "baseline_spread": m.reference.spread, "parts": dict(evaluator.parts),
            **({"picked_by": pickers[config.label()]} if pickers else {}),
        }
        rows.append(row)
        write()
        print(f"[{i + 1}/{len(configs)} {time.time() - t0:.0f}s] {row['config']:<22} {speedup:5.2f}x "
              f"{span(row['speedup_interval'])} calls {row['unet_calls_ratio']:.2f}x "
              f"loss {row['score_loss']:+.4f} psnr {row['psnr']:.1f}", flush=True)
    measured = [r for r in rows if "error" not in r]
    if args.picks:
        print(f"| configuration | picked by | speedup ({args.exec_mode}, {args.level:.0%}) | CLIP loss ({args.level:.0%}) | "
              f"PSNR dB | holds {args.max_loss:g}: point | upper end |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(measured, key=lambda r: -r["speedup"]):
            interval = r["score_loss_interval"]
            upper = "-" if interval is None else "yes" if interval[1] <= args.max_loss else "no"
            print(f"| {r['config']} | {'; '.join(r['picked_by'])} | {r['speedup']:.2f}x {span(r['speedup_interval'])} | "
                  f"{r['score_loss']:+.4f} {span(interval, '+.4f')} | {r['psnr']:.1f} | "
                  f"{'yes' if r['score_loss'] <= args.max_loss else 'no'} | {upper} |")
        return 0
    print(f"| configuration | UNet calls | speedup ({args.exec_mode}, {args.level:.0%}) | CLIP loss ({args.level:.0%}) | PSNR dB |")
    print("|---|---|---|---|---|")
    for r in sorted(measured, key=lambda r: -r["speedup"]):
        print(f"| {r['config']} | {r['unet_calls_ratio']:.2f}x fewer | {r['speedup']:.2f}x {span(r['speedup_interval'])} | "
              f"{r['score_loss']:+.4f} {span(r['score_loss_interval'], '+.4f')} | {r['psnr']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
