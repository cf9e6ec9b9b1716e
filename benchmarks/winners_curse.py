#!/usr/bin/env python
"""The winner's curse on the trained testbed: over several studies (sampler seeds), the pick's loss as
the search measured it vs its loss on held-out captions with fresh seeds, and how often the pick breaks
the bound out of sample, with and without ``--confidence``.

    python benchmarks/winners_curse.py --studies 10 --out benchmarks/results/winners-curse.json

Each study is ``optimize-sd run --pipe tiny --max-loss B`` (max-speedup mode: the search pushes
towards the bound, where the curse bites) with its own ``--seed``, in its own SQLite file, and with
``--validate N``; the numbers are read back from the study (the pick's ``score_loss`` and its stored
``validation``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from optimize.study.record import SCORE_LOSS, Validation, goal_of, open_study, study_result  # noqa: E402


def one_study(seed: int, args, confidence: float | None, workdir: str) -> dict:
    db = os.path.join(workdir, f"s{seed}-{confidence}.db")
    argv = [sys.executable, "-m", "optimize.cli", "run", "--pipe", "tiny", "--max-loss", str(args.max_loss),
            "--n-trials", str(args.trials), "--num-samples", str(args.prompts), "--steps", str(args.steps),
            "--validate", str(args.validate), "--seed", str(seed), "--storage", f"sqlite:///{db}",
            "--output", os.path.join(workdir, "search_params.json"), "--no-progress", "--images-per-trial", "0"]
    if confidence:
        argv += ["--confidence", str(confidence)]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    row = {"seed": seed, "confidence": confidence, "seconds": round(time.perf_counter() - start, 1), "rc": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return row
    study = open_study(f"sqlite:///{db}", None)
    best, _ = study_result(study, goal_of(study))
    if best is None:
        row["pick"] = None
        return row
    val = Validation.of(best)
    row.update(pick=best.user_attrs.get("config"), in_sample=best.user_attrs.get(SCORE_LOSS),
               held_out=val and val.loss, held_out_interval=val and val.loss_interval,
               within_bound_held_out=val and val.within_bound)
    return row


def summarize(rows: list[dict], max_loss: float) -> dict:
    picked = [r for r in rows if r.get("pick") and r.get("held_out") is not None]
    gaps = [r["held_out"] - r["in_sample"] for r in picked]
    return {"studies": len(rows), "with_pick": len(picked),
            "mean_in_sample": statistics.mean(r["in_sample"] for r in picked) if picked else None,
            "mean_held_out": statistics.mean(r["held_out"] for r in picked) if picked else None,
            "mean_gap": statistics.mean(gaps) if gaps else None,
            "breaks_bound_held_out": sum(r["held_out"] > max_loss for r in picked),
            "flagged_held_out": sum(r.get("within_bound_held_out") is False for r in picked),
            "seconds": round(sum(r["seconds"] for r in rows), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + studies - 1")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--validate", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-loss", type=float, default=0.02)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"args": vars(args), "rows": [], "summary": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for confidence in (None, args.confidence):
            for seed in range(args.first_seed, args.first_seed + args.studies):
                row = one_study(seed, args, confidence, workdir)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
            key = f"confidence={confidence}"
            result["summary"][key] = summarize([r for r in result["rows"] if r["confidence"] == confidence], args.max_loss)
            print(key, json.dumps(result["summary"][key]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("\n| --confidence | studies with a pick | mean in-sample loss | mean held-out loss | mean gap | held-out loss over the bound | flagged by validation |")
    print("|---|---|---|---|---|---|---|")
    for key, s in result["summary"].items():
        fmt = lambda v: "-" if v is None else f"{v:+.4f}"  # noqa: E731
        print(f"| {key.split('=')[1]} | {s['with_pick']} of {s['studies']} | {fmt(s['mean_in_sample'])} | "
              f"{fmt(s['mean_held_out'])} | {fmt(s['mean_gap'])} | {s['breaks_bound_held_out']} | {s['flagged_held_out']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
