"""The search-efficiency simulation (benchmarks/search_efficiency.py): its replay objective, the
original grid it compares with, and a small run of the whole benchmark (``--quick``, about 15 s).

The benchmark is a simulation built from the measured H200 landscape; these tests check that it
answers like a trial (deterministic per seed, costs = time x images), that its grid is the original
script's grid in its order, and that the small run produces every method's row with TPE succeeding.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys
import warnings

import numpy as np
import optuna
import pytest

from optimize.levers import Config, DeepCache, TGate, ToMe
from optimize.study.record import Goal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("search_efficiency", os.path.join(ROOT, "benchmarks", "search_efficiency.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


se = _load()


@pytest.fixture(scope="module")
def model():
    return se.LatencyModel.from_csv()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("se")
    with warnings.catch_warnings():
        result = se.main(["--quick", "--out", str(out)])
    return result, out


def _random_configs(n: int, seed: int = 0) -> list[Config]:
    """Configurations exactly as a real SD1.5 study samples them (optimize.search.objective.SearchSpace)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(se.SPACE.suggest(trial))
        study.tell(trial, 0.0)
    return configs


# --- the replay objective ---------------------------------------------------------------------------


def test_replay_objective_is_deterministic_per_seed(model):
    goal = Goal("max", None, 0.02)
    cfg = Config(deepcache=DeepCache(3, 0), tgate=TGate(10, 5, 1, 2))
    a = se.ReplayObjective(model, seed=3).evaluate(cfg, goal)
    b = se.ReplayObjective(model, seed=3).evaluate(cfg, goal)
    assert a == b
    others = {se.ReplayObjective(model, seed=s).evaluate(cfg, goal).speedup for s in range(8)}
    assert len(others) == 8  # the timing noise depends on the seed
    assert all(abs(math.log(s / a.true_speedup)) < 6 * model.sigma for s in others)


def test_costs_are_time_times_images(model):
    protocol = se.Protocol()
    obj = se.ReplayObjective(model, seed=0, protocol=protocol)
    for cfg in _random_configs(40):
        for goal in (Goal("max", None, 0.02), Goal("target", 2.0, 0.01)):
            r = obj.evaluate(cfg, goal)
            time_per_image = model.baseline_time / r.speedup
            assert r.cost > 0
            assert r.cost == pytest.approx(time_per_image * (protocol.warmup + protocol.repeats + protocol.prompts))
            assert r.loss == r.true_loss >= 0 and r.aborted is None
    # the speed gate skips scoring: only the warm-up and the timed repeats are paid
    slow = Config(tome=ToMe(0.5, 2))
    r = obj.evaluate(slow, Goal("target", 2.0, 0.02), options=se.Options(speed_gate=True))
    assert r.aborted == "speed" and r.loss is None
    assert r.cost == pytest.approx(model.baseline_time / r.speedup * (protocol.warmup + protocol.repeats))


def test_models_answer_for_every_configuration_of_the_space(model):
    configs = _random_configs(300, seed=1)
    a = se.arrays_from_configs(configs)
    s, loss = model.speedup(a), se.score_loss(a)
    assert np.all(np.isfinite(s)) and np.all(s > 0) and np.all(loss >= 0)
    codes = se.encode(a)
    assert int(codes.max()) < se.N_DC * se.N_TOME * se.N_TG
    labels = {c.label() for c in configs}
    assert len(set(codes.tolist())) == len(labels)  # one code per distinct configuration


def test_latency_model_keeps_the_measured_cells(model):
    rows = {r["config"]: r for r in csv.DictReader(open(se.LANDSCAPE, newline=""))}
    for i, n in enumerate(se.DC_N):
        for b in range(4):
            row = rows[f"dc({n},b{b})"]
            if float(row["iqr_rel"]) <= se.NOISY_CELL:
                assert model.dc_source[i, b] == "measured"
                assert model.dc_speedup[i, b] == pytest.approx(float(row["speedup"]))
    # combinations and single ToMe / T-GATE rows: the fitted factors stay close to the measurements
    close = [r for r in model.residuals if r["iqr_rel"] <= 0.06]
    assert close and all(abs(math.log(r["model"] / r["measured"])) < 0.12 for r in close)


def test_quality_model_gives_the_documented_losses_and_directions():
    """Against benchmarks/quality_model.md, not against the model's own constants: its table of
    DeepCache losses, the claims drawn from it, and every direction it says the loss moves in."""
    def loss(**kw):
        return float(se.score_loss(se.arrays_from_configs([Config(**kw)]))[0])

    assert loss() == 0.0
    # "Resulting DeepCache losses (branch 0 / branch 1)", to the 4 decimals printed there
    table = {3: (0.0008, 0.0004), 5: (0.0034, 0.0017), 7: (0.0076, 0.0038), 10: (0.0172, 0.0086)}
    for n, (b0, b1) in table.items():
        assert round(loss(deepcache=DeepCache(n, 0)), 4) == b0, n
        assert round(loss(deepcache=DeepCache(n, 1)), 4) == b1, n
    # "with a bound of 0.01, branch 0 is feasible up to N=7"; the README's 0.05 CLIP decline (loss
    # 0.0017) "lies between N=3 and N=5"
    assert loss(deepcache=DeepCache(7, 0)) <= 0.01 < loss(deepcache=DeepCache(8, 0))
    assert loss(deepcache=DeepCache(3, 0)) < 0.05 / 29.51 < loss(deepcache=DeepCache(5, 0))
    # T-GATE gating at 40% of the steps or later costs (almost) nothing: the floor, no rise
    floor = loss(tgate=TGate(20, 1, 1, 2))  # interval 1: no self-attention reuse
    assert floor == pytest.approx(0.0005) and loss(tgate=TGate(30, 1, 1, 2)) == pytest.approx(floor)
    # "rises with the cache interval, the merge ratio, max_downsample, the self-attention intervals;
    # falls with the branch id, the gate step and the warm-up"
    assert loss(deepcache=DeepCache(3, 0)) < loss(deepcache=DeepCache(5, 0)) < loss(deepcache=DeepCache(8, 0))
    assert loss(deepcache=DeepCache(5, 2)) < loss(deepcache=DeepCache(5, 1)) < loss(deepcache=DeepCache(5, 0))
    assert loss(tome=ToMe(0.3, 1)) < loss(tome=ToMe(0.6, 1)) < loss(tome=ToMe(0.6, 2)) < loss(tome=ToMe(0.6, 4))
    assert loss(tgate=TGate(19, 2, 1, 2)) < loss(tgate=TGate(10, 2, 1, 2)) < loss(tgate=TGate(5, 2, 1, 2))
    assert loss(tgate=TGate(10, 2, 1, 2)) < loss(tgate=TGate(10, 8, 1, 2))
    assert loss(tgate=TGate(10, 5, 1, 2)) < loss(tgate=TGate(10, 5, 5, 2))
    assert loss(tgate=TGate(10, 5, 1, 3)) < loss(tgate=TGate(10, 5, 1, 1))


# --- the original grid ------------------------------------------------------------------------------


def test_grid_is_the_reference_grid_in_nested_order():
    g = se.grid_arrays()
    assert g["dc"].size == se.grid_size() == 16 + 27 + 1800 + 16 * 27 + 16 * 1800 + 27 * 1800 + 16 * 27 * 1800
    # the first block: DeepCache alone, cache_interval outer (2..5), branch inner (0..3)
    first = [(int(n), int(b)) for n, b in zip(g["N"][:16], g["b"][:16])]
    assert first == [(n, b) for n in range(2, 6) for b in range(4)]
    assert not g["tome"][:16].any() and not g["tg"][:16].any()
    dc, tome, tg = g["dc"], g["tome"], g["tg"]
    assert sorted(set(g["N"][dc])) == [2, 3, 4, 5] and sorted(set(g["b"][dc])) == [0, 1, 2, 3]
    assert sorted(set(np.round(g["r"][tome], 2))) == [round(0.1 * i, 1) for i in range(1, 10)]
    assert sorted(set(g["md"][tome])) == [1, 2, 4]
    assert sorted(set(g["g"][tg])) == list(range(5, 20)) and sorted(set(g["sp"][tg])) == list(range(2, 10))
    assert sorted(set(g["fi"][tg])) == list(range(1, 6)) and sorted(set(g["w"][tg])) == [1, 2, 3]
    # combinations in order: singles, pairs, all three; T-GATE's warm-up is the innermost loop
    code = dc.astype(int) * 4 + tome.astype(int) * 2 + tg.astype(int)
    starts = np.flatnonzero(np.diff(code, prepend=-1))
    combos = [(bool(dc[i]), bool(tome[i]), bool(tg[i])) for i in starts]
    assert combos == [(True, False, False), (False, True, False), (False, False, True), (True, True, False),
                      (True, False, True), (False, True, True), (True, True, True)]
    start = 16 + 27
    assert [int(w) for w in g["w"][start:start + 4]] == [1, 2, 3, 1]
    assert int(g["fi"][start + 3]) == 2


def test_incumbent_index_keeps_the_first_best():
    key = np.array([3.0, 2.0, 2.0, 5.0, 1.0])
    feasible = np.array([False, True, True, True, False])
    assert se._incumbent_index(key, feasible).tolist() == [-1, 1, 1, 1, 1]


# --- the small benchmark ----------------------------------------------------------------------------


def test_quick_benchmark_has_every_method_and_tpe_succeeds(quick):
    result, out = quick
    assert result["simulation"] is True and "SIMULATED" in result["note"]
    summary = result["summary"]
    assert set(summary) == {"max-loss0.02", "target2-loss0.02"}
    for slug, s in summary.items():
        assert {"grid", "grid-shuffled", "random", "gp", "tpe", se.RECOMMENDED} <= set(s), slug
        assert s["tpe"]["reached"] >= 1  # TPE finds a feasible configuration within 2% of the grid's best
        assert s["grid"]["median_full_cost"] > s["grid"]["median_time_to_hit"] > 0
    runs = result["runs"]
    tpe = [r for r in runs if r["method"] == "tpe"]
    assert tpe and all(r["spent"] > 0 and r["measured"] <= r["trials"] for r in tpe)
    # files: JSON with the same summary, CSV with one row per run
    with open(os.path.join(out, "search_efficiency.json")) as f:
        saved = json.load(f)
    assert saved["summary"].keys() == summary.keys() and saved["simulation"] is True
    with open(os.path.join(out, "search_efficiency.csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == len(runs)


def test_quick_benchmark_references_come_from_the_grid(quick, model):
    result, _ = quick
    g = se.grid_arrays()
    s, loss = model.speedup(g), se.score_loss(g)
    ref = result["references"]["max-loss0.02"]["speedup"]
    assert ref == pytest.approx(float(s[loss <= 0.02].max()))
    target = result["references"]["target2-loss0.02"]["loss"]
    assert target == pytest.approx(float(loss[(loss <= 0.02) & (s >= 2.0)].min()))
