"""The compile lever on a GPU: what it costs to compile, what it gains per image, and whether it computes
what the same configuration computes uncompiled.

    python benchmarks/gpu_compile.py --out DIR                          # SD1.5 random weights, 50 steps, graphs
    python benchmarks/gpu_compile.py --configs dc3,tgate --out DIR      # some of them
    python benchmarks/gpu_compile.py --exec eager --configs base --out DIR
    python benchmarks/gpu_compile.py --pipe sdxl --steps 30 --configs base,dc5 --also '{"vae": true}' \
        --eager-baseline --out DIR                                        # SDXL, fp16 decode, against eager
    python benchmarks/gpu_compile.py --pipe tiny --backend eager --steps 10 --out DIR   # the CPU check (Dynamo only)

For each configuration (``--configs``, from :data:`CONFIGS`), in ``--exec`` mode: the configuration alone
and with the compile lever; for the compiled one the first call's seconds (Dynamo, inductor and the graph
captures), torch's compile seconds, the Dynamo graphs it added, those added by a second call and by the
same configuration applied again (none expected but T-GATE's one: its attention caches exist from the
second call on), ms per image over ``--rounds`` calls (the host clock around synchronized calls), and
the largest pixel difference from the uncompiled images. One JSON under ``--out``, written after every
configuration, so a command stopped by its time limit keeps what it measured. Run it twice with the
same ``TORCHINDUCTOR_CACHE_DIR`` (default: under ``--out``) to see what inductor's on-disk cache saves
a second process (``compile_s`` of the second run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from optimize.levers import Accelerated, Config  # noqa: E402
from optimize.runtime.compiling import compile_seconds  # noqa: E402
from optimize.runtime.pipelines import default_guidance, is_xl, load_pipeline, resolve_pipe  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402

TGATE = {"tgate": True, "tgate.gate_step": 10, "tgate.sp_interval": 5, "tgate.fi_interval": 1, "tgate.warm_up": 2}
DC3 = {"deepcache": True, "deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0}
CONFIGS = {"base": {}, "dc3": DC3, "dc5": {**DC3, "deepcache.cache_interval": 5}, "tgate": TGATE,
           "dc3-tgate": {**DC3, **TGATE}, "tome": {"tome": True, "tome.ratio": 0.5, "tome.max_downsample": 1}}


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def call(fn, args, seed: int = 42) -> np.ndarray:
    return np.asarray(fn(prompt=["a photograph of an astronaut riding a horse"], num_inference_steps=args.steps,
                         guidance_scale=args.guidance, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(seed)).images)


def ms_per_image(fn, args) -> list[float]:
    out = []
    for _ in range(args.rounds):
        sync()
        start = time.perf_counter()
        call(fn, args)
        sync()
        out.append(1000 * (time.perf_counter() - start))
    return out


def measure(pipe, name: str, params: dict, args) -> dict:
    row = {"config": name}
    with Accelerated(pipe, Config.from_params(params), exec=args.exec) as plain:
        want = call(plain, args)
        row["uncompiled_ms"] = ms_per_image(plain, args)
    config = Config.from_params({**params, "compile": True})
    graphs, compiling, start = dynamo_graphs(), compile_seconds(), time.perf_counter()
    with Accelerated(pipe, config, exec=args.exec) as fast:
        got = call(fast, args)
        sync()
        # kinds_compiled: the step kinds whose calls compiled
        row.update(first_call_s=time.perf_counter() - start, compile_s=compile_seconds() - compiling,
                   graphs=dynamo_graphs() - graphs, kinds_compiled=len(fast.step.compute.compiling))
        graphs = dynamo_graphs()
        again = call(fast, args)
        row["graphs_second_call"] = dynamo_graphs() - graphs
        row["compiled_ms"] = ms_per_image(fast, args)
    graphs = dynamo_graphs()
    with Accelerated(pipe, config, exec=args.exec) as reapplied:
        call(reapplied, args)
    row["graphs_reapplied"] = dynamo_graphs() - graphs
    row["max_abs_diff_vs_uncompiled"] = float(np.abs(got - want).max())
    row["second_call_equal_first"] = bool(np.array_equal(got, again))
    row["speedup"] = float(np.median(row["uncompiled_ms"]) / np.median(row["compiled_ms"]))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipe", default="sd1.5")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--exec", default="graphs", choices=("graphs", "eager"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", default="inductor", help="the lever's compiler (eager: Dynamo only, for a CPU check)")
    p.add_argument("--also", default="{}", help="flat params (JSON) added to every configuration, e.g. '{\"vae\": true}'")
    p.add_argument("--eager-baseline", action="store_true",
                   help="also time the untouched pipeline eagerly: each row's speedup over it")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.abspath(args.out), "inductor-cache"))
    __import__("optimize.levers.compile", fromlist=["BACKEND"]).BACKEND = args.backend
    cuda = torch.cuda.is_available()
    if args.exec == "graphs" and not cuda:
        raise SystemExit("--exec graphs needs CUDA (use --exec eager on a CPU)")
    tiny = args.pipe.startswith("tiny")
    pipe = load_pipeline(resolve_pipe(args.pipe, random_weights=not tiny), "ddim", "cuda" if cuda else "cpu",
                         "fp16" if cuda else "fp32")
    pipe.set_progress_bar_config(disable=True)
    args.guidance = default_guidance(is_xl(pipe))
    result = {"meta": {"pipe": args.pipe, "steps": args.steps, "exec": args.exec, "backend": args.backend,
                       "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                       "cache_dir": os.environ["TORCHINDUCTOR_CACHE_DIR"], "date": dt.date.today().isoformat()},
              "rows": []}
    path = os.path.join(args.out, f"compile-{args.pipe}-{args.exec}-{args.backend}.json")
    also = json.loads(args.also)
    result["meta"]["also"] = also
    with torch.no_grad():
        if args.eager_baseline:
            call(pipe, args)
            result["eager_baseline_ms"] = ms_per_image(pipe, args)
            eager = float(np.min(result["eager_baseline_ms"]))
            print(json.dumps({"eager_baseline_ms": result["eager_baseline_ms"]}), flush=True)
        for name in args.configs.split(","):
            try:
                row = measure(pipe, name, {**CONFIGS[name], **also}, args)
                if args.eager_baseline:
                    row["vs_eager_baseline"] = {"uncompiled": eager / float(np.min(row["uncompiled_ms"])),
                                                "compiled": eager / float(np.min(row["compiled_ms"]))}
            except Exception as exc:  # noqa: BLE001 - the next configuration still runs
                row = {"config": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            atomic_write(path, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
