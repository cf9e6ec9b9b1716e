#!/usr/bin/env python
"""Does searching the sampling schedule jointly with caching find a faster feasible configuration than
caching alone, at the same bound and trial budget? Runs real studies on the trained testbed, as a user
runs them, for each arm and seed, and reads back each study's pick and its held-out validation.

Arms: ``joint`` (every lever, the default ``--methods``) and ``caching`` (``--methods
deepcache,tome,tgate``). Every study: ``optimize-sd run --pipe tiny --steps 50 --max-loss 0.02`` with the same
trial budget and seed, timed in the tool's default paired rounds, its pick validated by the run on
held-out captions with fresh seeds (``--validate``; the run passes over a pick that breaks the bound
there and validates the next best). Those captions chose among candidates, so each study's final pick
is then checked on ``--check`` captions after them (``optimize-sd validate --trial N`` on a prompt file
that holds the study's search captions, then those): the column that says whether the pick holds.

    python benchmarks/schedule_search.py --seeds 0,1,2,3,4 --n-trials 12 --out benchmarks/results/schedule_search_cpu.json
    python benchmarks/schedule_search.py --confidence 0.9 --out benchmarks/results/schedule_search_conf90_cpu.json
    python benchmarks/schedule_search.py --steps 20 --n-trials 20 --validate -1 --check 32 --out F  # the tool's defaults
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

import optuna  # noqa: E402

from optimize.measure.prompts import load_heldout, load_prompts  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402
from optimize.study.record import StudyRecord  # noqa: E402

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
           *(["--validate", str(args.validate)] if args.validate >= 0 else []),
           "--storage", storage, "--output", output, "--no-progress", "--images-per-trial", "0",
           "--study", f"{arm}-{seed}"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        return {"arm": arm, "seed": seed, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:],
                "seconds": seconds}
    study = optuna.load_study(study_name=f"{arm}-{seed}", storage=storage)
    # every trial the run validated, in trial order: the candidates it passed over and its pick
    candidates = [{"trial": t.number, "config": t.user_attrs.get("config"), "speedup": t.user_attrs.get("speedup"),
                   "held_out_loss": t.system_attrs["validation"]["loss"],
                   "within_bound": t.system_attrs["validation"]["within_bound"]}
                  for t in study.trials if t.system_attrs.get("validation")]
    entries = {}
    if os.path.exists(output):
        with open(output) as f:
            entries = json.load(f)
    if not entries:  # no trial feasible, or every one passed over: run writes no result, and says so last
        return {"arm": arm, "seed": seed, "seconds": seconds, "config": None, "candidates": candidates,
                "note": proc.stdout.strip().splitlines()[-1:], "command": " ".join(cmd[2:])}
    entry = next(iter(entries.values()))
    validation = entry.get("validation") or {}
    row = {"arm": arm, "seed": seed, "seconds": seconds, "trial": entry.get("trial"), "config": entry.get("config"),
           "speedup": entry.get("speedup"), "speedup_interval": entry.get("speedup_interval"), "loss": entry.get("loss"),
           "loss_interval": entry.get("loss_interval"), "validation": validation, "candidates": candidates,
           "command": " ".join(cmd[2:])}
    if args.check:
        used = max((t.system_attrs["validation"]["n"] for t in study.trials if t.system_attrs.get("validation")),
                   default=0)  # the held-out captions the run validated on
        row["check"] = check_pick(study, entry["trial"], storage, args.check, workdir, used)
    return row


def check_pick(study, trial: int, storage: str, n: int, workdir: str, skip: int) -> dict:
    """Trial ``trial`` on ``n`` captions after the ``skip`` held-out ones the run validated on: a prompt
    file with the study's search captions first (``validate`` checks that they are the study's), then
    those. Returns the stored validation (it replaces the run's on that trial; the row kept the run's)."""
    ns = StudyRecord.load(study).fingerprint.num_samples
    path = os.path.join(workdir, f"{study.study_name}-check.txt")
    with open(path, "w") as f:
        f.write("\n".join(load_prompts("testbed", ns) + load_heldout("testbed", ns, skip + n)[skip:]) + "\n")
    cmd = [sys.executable, "-m", "optimize.cli", "validate", "--storage", storage, "--study", study.study_name,
           "--trial", str(trial), "-n", str(n), "--prompts", path, "--output", os.path.join(workdir, "scratch.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: it broke the bound or did not reproduce its speedup; still a result
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    trial = optuna.load_study(study_name=study.study_name, storage=storage).trials[trial]
    v = trial.system_attrs["validation"]
    return {k: v[k] for k in ("n", "loss", "loss_interval", "speedup", "speedup_interval", "within_bound",
                              "speedup_reproduced") if k in v} | {"captions_after": ns + skip}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--steps", type=int, default=50, help="the reference's DDIM steps (the testbed's default is 20)")
    ap.add_argument("--max-loss", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=None, help="[default: the tool's]")
    ap.add_argument("--scored-repeats", type=int, default=None, help="[default: the tool's]")
    ap.add_argument("--validate", type=int, default=16, help="the run's --validate (-1: the tool's default)")
    ap.add_argument("--check", type=int, default=0, help="captions after the run's held-out ones to check the "
                                                         "final pick on (0: none)")
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
                v, c = row.get("validation", {}), row.get("check", {})
                print(f"{arm:8} seed {seed}: {row.get('config')} {row.get('speedup') or 0:.2f}x loss "
                      f"{row.get('loss') or 0:+.4f}; held out: {v.get('speedup', 0) or 0:.2f}x loss "
                      f"{v.get('loss', 0) or 0:+.4f} within bound={v.get('within_bound')}; passed over "
                      f"{sum(not x['within_bound'] for x in row.get('candidates', []))}; checked: "
                      f"{c.get('speedup', 0) or 0:.2f}x loss {c.get('loss', 0) or 0:+.4f} within bound="
                      f"{c.get('within_bound')} ({row['seconds']:.0f} s) {row.get('error', '')}{row.get('note', '')}",
                      flush=True)
                atomic_write(args.out, json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
