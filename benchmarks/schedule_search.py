#!/usr/bin/env python
"""Does searching the sampling schedule jointly with caching find a faster feasible configuration than
caching alone, at the same bound and trial budget? Runs real studies on the trained testbed, as a user
runs them, for each arm and seed, and reads back each study's pick and its held-out validation.

Arms: ``joint`` (every lever, the default ``--methods``) and ``caching`` (``--methods
deepcache,tome,tgate``). Every study: ``optimize-sd run --pipe tiny --steps 50 --max-loss 0.02`` with the same
trial budget and seed, timed in the tool's default paired rounds, and its pick validated on held-out
captions with fresh seeds (``--validate``).

    python benchmarks/schedule_search.py --seeds 0,1,2,3,4 --n-trials 12 --out benchmarks/results/schedule_search_cpu.json
    python benchmarks/schedule_search.py --confidence 0.9 --out benchmarks/results/schedule_search_conf90_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optimize.study.files import atomic_write  # noqa: E402

ARMS = {"joint": "schedule,deepcache,tome,tgate", "caching": "deepcache,tome,tgate"}


def run_study(arm: str, seed: int, args, workdir: str) -> dict:
    storage = f"sqlite:///{os.path.join(workdir, f'{arm}-{seed}.db')}"
    output = os.path.join(workdir, f"{arm}-{seed}.json")
    cmd = [sys.executable, "-m", "optimize.cli", "run", "--pipe", "tiny", "--steps", str(args.steps),
           "--max-loss", str(args.max_loss),
           "--methods", ARMS[arm], "--n-trials", str(args.n_trials), "--seed", str(seed),
           *(["--repeats", str(args.repeats)] if args.repeats else []),
           *(["--scored-repeats", str(args.scored_repeats)] if args.scored_repeats else []),
           *(["--confidence", str(args.confidence)] if args.confidence else []),
           *(["--num-samples", str(args.num_samples)] if args.num_samples else []),
           "--validate", str(args.validate), "--storage", storage, "--output", output, "--no-progress",
           "--images-per-trial", "0", "--study", f"{arm}-{seed}"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        return {"arm": arm, "seed": seed, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:],
                "seconds": seconds}
    if not os.path.exists(output):  # no trial was feasible: run writes no result, and says so last
        return {"arm": arm, "seed": seed, "seconds": seconds, "config": None,
                "note": proc.stdout.strip().splitlines()[-1:], "command": " ".join(cmd[2:])}
    with open(output) as f:
        entry = next(iter(json.load(f).values()))
    validation = entry.get("validation") or {}
    return {"arm": arm, "seed": seed, "seconds": seconds, "config": entry.get("config"), "speedup": entry.get("speedup"),
            "speedup_interval": entry.get("speedup_interval"), "loss": entry.get("loss"),
            "loss_interval": entry.get("loss_interval"), "validation": validation, "command": " ".join(cmd[2:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=50, help="the reference's DDIM steps (the testbed's default is 20)")
    ap.add_argument("--max-loss", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=None, help="[default: the tool's]")
    ap.add_argument("--scored-repeats", type=int, default=None, help="[default: the tool's]")
    ap.add_argument("--validate", type=int, default=16)
    ap.add_argument("--confidence", type=float, default=None,
                    help="feasible only on the loss interval's upper end, in the search and held out [default: off]")
    ap.add_argument("--num-samples", type=int, default=None, help="search captions [default: the tool's]")
    ap.add_argument("--arms", default="joint,caching")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in args.arms.split(","):  # interleaved: both arms see the same machine load
                row = run_study(arm, seed, args, workdir)
                rows.append(row)
                v = row.get("validation", {})
                print(f"{arm:8} seed {seed}: {row.get('config')} {row.get('speedup') or 0:.2f}x loss "
                      f"{row.get('loss') or 0:+.4f}; held out: {v.get('speedup', 0) or 0:.2f}x loss "
                      f"{v.get('loss', 0) or 0:+.4f} within bound={v.get('within_bound')} ({row['seconds']:.0f} s) "
                      f"{row.get('error', '')}{row.get('note', '')}", flush=True)
                atomic_write(args.out, json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
