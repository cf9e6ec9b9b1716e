"""Trials per hour of a study, from the trials' own start/end timestamps.

    python benchmarks/study_throughput.py --storage sqlite:///studies/optimize-sd.db --study NAME

Steady-state rate: finished trials (complete, pruned or failed) per hour between the first trial's
start and the last trial's end, so model loading and the baseline are not counted; per worker too.
Used to compare one worker with several on one study (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import optuna
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def throughput(study: optuna.Study) -> dict:
    trials = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.datetime_start and t.datetime_complete]
    if not trials:
        return {"study": study.study_name, "finished": 0}
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    hours = (end - start).total_seconds() / 3600
    states = Counter(t.state.name.lower() for t in trials)
    workers = Counter(t.user_attrs.get("worker", "?") for t in trials)
    durations = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    return {
        "study": study.study_name, "finished": len(trials), "states": dict(states), "workers": dict(workers),
        "span_s": hours * 3600, "trials_per_hour": len(trials) / hours if hours > 0 else None,
        "median_trial_s": durations[len(durations) // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--study", action="append", help="study name (repeatable; default: every study)")
    args = ap.parse_args()
    names = args.study or [s.study_name for s in optuna.get_all_study_summaries(args.storage)]
    for name in names:
        r = throughput(optuna.load_study(study_name=name, storage=args.storage))
        print(json.dumps(r))


if __name__ == "__main__":
    main()
