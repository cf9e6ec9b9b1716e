#!/usr/bin/env python
"""What one scored trial costs, and what its time goes on, at several scoring batches.

    python benchmarks/scored_trial.py --pipe tiny --score-batch 1,2,4,8 --rounds 2 \\
        --out benchmarks/results/scored-trial-tiny-cpu.json
    python benchmarks/scored_trial.py --pipe sd1.5 --random-weights --exec graphs --num-samples 32 \\
        --score-batch 1,8 --out benchmarks/results/scored-trial-sd1.5-graphs.json

For each scoring batch (``--score-batch``, a list) a fresh study goes through ``optimize-sd run``'s own
steps (:class:`optimize.app.runner.Search`: load, baseline, objective, trials) with the run options
given here (anything ``run`` takes can follow ``--``), and its trials' stored ``wall_s`` and ``parts``
are read back: timing rounds, scoring pass, CLIP, fidelity, graph capture, applying, and whatever a
lever reports (compile). The trials are the study's warm starts (``--methods deepcache``: DeepCache
N=3, then N=5), the same configurations at every scoring batch; the speed gate is off so every trial
is scored. ``--rounds`` repeats the whole list (b1, b8, b1, b8, ...), so a shared machine's load drift
falls on every batch alike. After its trials each study measures the untouched pipeline as a trial
(``untouched_vs_baseline``: loss 0 and PSNR at its cap where generation is deterministic, since the
baseline was scored the same way), and its baseline images are compared with those of the first
batch listed: per-prompt CLIP score difference and PSNR, so a batched scoring pass is seen to make
the same pictures. Writes JSON (``--out``) and prints one line per study.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from optimize.app.cli import check_run_options, run as run_command  # noqa: E402
from optimize.app.runner import Search  # noqa: E402
from optimize.levers import Config  # noqa: E402
from optimize.measure.metrics import score_loss  # noqa: E402
from optimize.study.record import PARTS, REUSED_FROM, SEQUENTIAL_PARTS, WALL  # noqa: E402


def device_text(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def one_study(argv: list[str], echo) -> tuple[dict, "np.ndarray"]:
    """Run the study ``optimize-sd run ARGV`` describes in ``directory``; its times and trials."""
    spec, opts = check_run_options(run_command.make_context("run", list(argv)).params)
    search = Search(spec, opts, echo)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    search.open()
    search.load()
    loaded = time.perf_counter()
    search.get_baseline()
    measured = time.perf_counter()
    search.build_objective()
    search.optimize()
    done = time.perf_counter()
    reference = search.fidelity.reference.permute(0, 2, 3, 1).numpy()  # the baseline images, N x H x W x 3
    # the untouched pipeline measured as a trial is: against the baseline scored the same way, loss 0
    untouched = search.evaluator.measure(Config())
    fidelity = search.fidelity.per_image(untouched.images)
    identity = {"score_loss": score_loss(search.baseline.clip_score, untouched.clip_score),
                "psnr_min": float(fidelity["psnr"].min()), "ssim_min": float(fidelity["ssim"].min()),
                "speedup": untouched.speedup, "parts": untouched.parts}
    trials = []
    for t in search.study.get_trials(deepcopy=False):
        a = t.user_attrs
        trials.append({"number": t.number, "state": t.state.name.lower(), "config": a.get("config"),
                       "reused": REUSED_FROM in a, WALL: a.get(WALL), PARTS: a.get(PARTS),
                       **{k: a.get(k) for k in ("speedup", "score_loss", "clip_score", "psnr", "ssim",
                                                 "time_per_image", "baseline_time")}})
    out = {"score_batch": search.evaluator.score_batch, "load_s": loaded - start, "baseline_s": measured - loaded,
           "trials_s": done - measured, "load_before": load, "load_after": os.getloadavg()[0],
           "baseline_clip": search.baseline.clip_score, "baseline_scores": list(search.baseline.scores),
           "baseline_time_per_image": search.baseline.time_per_image, "untouched_vs_baseline": identity,
           "trials": trials}
    search.evaluator.close()
    del search
    gc.collect()
    return out, reference


def summary(studies: list[dict]) -> dict:
    """Per scoring batch: the median over its studies' scored trials of the wall time and each part."""
    by_batch: dict = {}
    for s in studies:
        scored = [t for t in s["trials"] if t["state"] == "complete" and not t["reused"] and t[WALL] is not None]
        by_batch.setdefault(s["score_batch"], []).extend(scored)
    out = {}
    for batch, trials in by_batch.items():
        order = {k: i for i, k in enumerate(SEQUENTIAL_PARTS)}  # as they ran; the parts within them after
        names = sorted({k for t in trials for k in t[PARTS]}, key=lambda k: (order.get(k, len(order)), k))
        out[str(batch)] = {"trials": len(trials), "wall_s": statistics.median(t[WALL] for t in trials),
                           "parts": {k: statistics.median(t[PARTS].get(k, 0.0) for t in trials) for k in names}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipe", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--exec", dest="exec_mode", default=None)
    ap.add_argument("--num-samples", type=int, default=None, help="[default: run's: 32; tiny: 8]")
    ap.add_argument("--score-batch", default="1,8", help="scoring batches to compare, in order (default 1,8)")
    ap.add_argument("--methods", default="deepcache")
    ap.add_argument("--n-trials", type=int, default=2, help="trials per study (warm starts first)")
    ap.add_argument("--rounds", type=int, default=1, help="times the list of scoring batches is run")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("extra", nargs="*", help="after --: more optimize-sd run options")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # as optimize-sd's own command line does
    warnings.filterwarnings("ignore", message=".*experimental.*")
    batches = [int(b) for b in args.score_batch.split(",")]
    directory = tempfile.mkdtemp(prefix="scored-trial-")
    lines = []

    def echo(line: str, err: bool = False) -> None:
        lines.append(line)
        print(line, file=sys.stderr if err else sys.stdout, flush=True)

    common = ["--pipe", args.pipe, "--methods", args.methods, "--n-trials", str(args.n_trials), "--no-speed-gate",
              "--validate", "0", "--no-progress", "--output", os.path.join(directory, "search_params.json"),
              *(["--random-weights"] if args.random_weights else []),
              *(["--exec", args.exec_mode] if args.exec_mode else []),
              *(["--num-samples", str(args.num_samples)] if args.num_samples else []),
              *(["--device", args.device] if args.device else []), *args.extra]
    studies, first = [], None

    import torch

    from optimize.runtime.pipelines import resolve_device
    from optimize.study.files import atomic_write

    about = {"device": device_text(resolve_device(args.device)), "torch": torch.__version__,
             "command": " ".join(["python", "benchmarks/scored_trial.py", *sys.argv[1:]])}

    def write(studies: list[dict]) -> dict:
        result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **about,
                  "summary": summary(studies), "studies": studies}
        if args.out:
            atomic_write(args.out, json.dumps(result, indent=2) + "\n")
        return result

    for round_ in range(args.rounds):
        for batch in batches:
            name = f"b{batch}-r{round_}"
            argv = [*common, "--score-batch", str(batch), "--study", name,
                    "--storage", f"sqlite:///{os.path.join(directory, name + '.db')}"]
            study, reference = one_study(argv, echo)
            study["round"] = round_
            if first is None:
                first = (study, reference)
            else:  # the same prompts and seeds: the baseline images of another scoring batch
                import numpy as np

                from optimize.measure.metrics import FidelityScorer

                fidelity = FidelityScorer(list(first[1])).per_image(list(reference))
                study["vs_first_batch"] = {
                    "first_batch": first[0]["score_batch"],
                    "clip_mean_diff": study["baseline_clip"] - first[0]["baseline_clip"],
                    "clip_max_abs_per_prompt": float(np.max(np.abs(np.subtract(study["baseline_scores"],
                                                                                 first[0]["baseline_scores"])))),
                    "psnr_min": float(fidelity["psnr"].min()), "ssim_min": float(fidelity["ssim"].min()),
                    "max_pixel_diff": int(np.abs(reference.astype(int) - first[1].astype(int)).max())}
            studies.append(study)
            write(studies)  # after every study: a command stopped by its time limit keeps what it measured
            walls = [t[WALL] for t in study["trials"] if t[WALL] is not None and not t["reused"]]
            same = study["untouched_vs_baseline"]
            print(f"score batch {study['score_batch']}: trials {', '.join(f'{w:.1f}' for w in walls)} s "
                  f"(baseline {study['baseline_s']:.1f} s, load avg {study['load_before']:.1f}); untouched vs "
                  f"baseline: loss {same['score_loss']:+.6f}, min psnr {same['psnr_min']:.1f}", flush=True)
    print(json.dumps(write(studies)["summary"], indent=2))


if __name__ == "__main__":
    main()
