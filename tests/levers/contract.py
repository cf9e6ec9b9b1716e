"""The contract every lever keeps; each lever's test module subclasses :class:`LeverContract`.

A subclass sets ``lever`` and, where the midpoint of the lever's search grid would not do, ``on``
(params that change the tiny pipeline's output). The contract:

* applied, the output differs; removed, the pipeline is bit-identical to the untouched one and
  carries nothing the lever added (the UNet holds the very parameter tensors it had, at the same
  addresses, and the same modules); removal is idempotent;
* a second call equals the first (per-call reset);
* under the fake graph backend the graphed output equals the eager one, the step kinds of two calls
  are the same sequence, and the second call captures nothing;
* an invalid value of any field is an ``InvalidConfig`` that names the field; so is a failed apply,
  which leaves the pipeline untouched;
* whatever the search draws is valid, and its params round-trip through the stored form.
"""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from conftest import generate
from fakegraphs import FakeBackend

import optimize
from optimize.levers import LEVERS, Accelerated, Config, Context, InvalidConfig
from optimize.levers.base import Choice, Float, Int

STEPS = 12
PROMPT = ["a red fox in the snow"]
# what any lever may add to a module or the pipeline; none of it may stay after removal
LEFTOVER_MODULE_ATTRS = ("forward", "cache", "_tome_info", "extra_repr", "_compiled_call_impl")
PIPES = {"tiny": "tiny_pipe", "tiny-xl": "tiny_xl_pipe", "tiny-xl-fp16": "tiny_xl_fp16_pipe"}
LEFTOVER_PIPE_ATTRS = ("tgate", "deepcache", "_optimize_sd_applied", "set_timesteps")


def context(pipe, steps: int = STEPS) -> Context:
    return Context.of(pipe, steps, 7.5, "ddim")


def midpoint(lever, ctx: Context):
    """A deterministic, typical setting: the middle of each field's search range (or, where those do
    not go together, the first valid setting of the grid)."""
    from dataclasses import fields

    values = {}
    for f in fields(lever.Params):
        grid = f.metadata["search"].grid(ctx)
        values[f.name] = grid[len(grid) // 2]
    params = lever.Params(**values)
    try:
        lever.validate(params, ctx)
        return params
    except InvalidConfig:
        return next(iter(lever.grid(ctx)))


def assert_clean(pipe) -> None:
    for name, module in pipe.unet.named_modules():
        left = set(LEFTOVER_MODULE_ATTRS) & set(vars(module))
        assert not left, f"unet module {name or '<unet>'} still has instance attributes {sorted(left)}"
        assert "ToMe" not in type(module).__name__, f"{name} is still a tomesd class"
        assert not (module._forward_hooks or module._forward_pre_hooks), f"unet module {name or '<unet>'} has hooks left"
    for attr in LEFTOVER_PIPE_ATTRS:
        assert attr not in vars(pipe) and attr not in vars(pipe.scheduler), f"{attr!r} left behind"


def unet_state(pipe):
    """The UNet's modules and parameters as objects and addresses: removal puts back the very tensors
    (a graph captured before reads them at their addresses), not equal copies."""
    unet = pipe.unet
    return ([name for name, _ in unet.named_modules()],
            {name: (p, p.data_ptr(), p.dtype, p.stride()) for name, p in unet.named_parameters()},
            pipe.vae.config)


def assert_same_state(pipe, before) -> None:
    modules, params, vae_config = unet_state(pipe)
    assert modules == before[0], f"modules added or gone: {sorted(set(modules) ^ set(before[0]))[:5]}"
    changed = [n for n, (p, ptr, dtype, stride) in params.items()
               if (p is not before[1][n][0]) or (ptr, dtype, stride) != before[1][n][1:]]
    assert not changed, f"parameters not restored: {changed[:5]}"
    assert vae_config is before[2], "the VAE's config was not put back"


def invalid_values(valid, ctx: Context) -> list:
    """Values a field's ``valid`` declaration refuses: the wrong type and each side of its range."""
    out = ["not a number", None]
    if isinstance(valid, (Int, Float)):
        low, high = (b(ctx) if callable(b) else b for b in (valid.low, valid.high))
        if low is not None:
            out.append(low if isinstance(valid, Float) and valid.open else low - 1)
        if high is not None:
            out.append(high if isinstance(valid, Float) and valid.open else high + 1)
        if isinstance(valid, Int):
            out.append(True)  # a bool is no integer here
    elif isinstance(valid, Choice):
        out.append("not-an-option")
    return out


class LeverContract:
    lever = None  # the Lever under test
    on = None  # params that change the output; None: the midpoint of its search grid
    pipe_name = "tiny"

    @pytest.fixture
    def pipe(self, request):
        return request.getfixturevalue(PIPES[self.pipe_name])

    def params(self, pipe):
        return self.on if self.on is not None else midpoint(self.lever, context(pipe))

    def config(self, pipe) -> Config:
        return Config(**{self.lever.name: self.params(pipe)})

    # -- effect and exact removal --------------------------------------------------------------------
    def test_apply_changes_the_output_and_remove_restores_it_bit_for_bit(self, pipe):
        baseline = generate(pipe, PROMPT, STEPS)
        before = unet_state(pipe)
        acc = optimize.accelerate(pipe, self.config(pipe))
        with acc:
            out = generate(acc, PROMPT, STEPS)
        assert np.isfinite(out).all() and out.shape == baseline.shape
        assert not np.array_equal(out, baseline), f"{self.config(pipe).label()} had no effect"
        np.testing.assert_array_equal(generate(pipe, PROMPT, STEPS), baseline)
        assert_clean(pipe)
        assert_same_state(pipe, before)
        acc.remove()  # idempotent
        np.testing.assert_array_equal(generate(pipe, PROMPT, STEPS), baseline)
        assert_same_state(pipe, before)

    def test_a_second_call_equals_the_first(self, pipe):
        with optimize.accelerate(pipe, self.config(pipe), seed=5) as fast:
            first = generate(fast, PROMPT, STEPS)
            second = generate(fast, PROMPT, STEPS)
        np.testing.assert_array_equal(first, second)

    # -- graph modes ---------------------------------------------------------------------------------
    def test_graphed_output_and_step_kinds_are_stable(self, pipe):
        config = self.config(pipe)
        with Accelerated(pipe, config) as eager:
            want = generate(eager, PROMPT, STEPS)
        backend = FakeBackend()
        acc = Accelerated(pipe, config, exec="graphs", graph_backend=backend).apply()
        try:
            acc.graphs.record_kinds = True
            first = generate(acc, PROMPT, STEPS)
            kinds, captures = list(acc.graphs.stats.kinds), backend.captures
            second = generate(acc, PROMPT, STEPS)
            again = acc.graphs.stats.kinds[len(kinds):]
        finally:
            acc.remove()
        np.testing.assert_array_equal(first, want)
        np.testing.assert_array_equal(second, want)
        assert again == kinds, "the second call stepped through other kinds"
        assert backend.captures == captures, "the second call captured again"
        assert_clean(pipe)

    # -- bad input -----------------------------------------------------------------------------------
    def test_an_invalid_value_names_its_parameter(self, pipe):
        from dataclasses import fields, replace

        ctx = context(pipe)
        good = self.params(pipe)
        self.lever.validate(good, ctx)
        for f in fields(good):
            for value in invalid_values(f.metadata["valid"], ctx):
                bad = replace(good, **{f.name: value})
                with pytest.raises(InvalidConfig, match=self.lever.key(f.name).replace(".", r"\.")):
                    Config(**{self.lever.name: bad}).validate(pipe, STEPS, 7.5)
                with pytest.raises(InvalidConfig, match=self.lever.key(f.name).replace(".", r"\.")):
                    optimize.accelerate(pipe, Config(**{self.lever.name: bad})).apply()
        assert_clean(pipe)

    def test_a_failure_after_it_was_applied_leaves_the_pipeline_untouched(self, pipe, monkeypatch):
        """A lever applied after this one fails: this one is removed again, exactly."""
        baseline = generate(pipe, PROMPT, STEPS)

        class Failing:
            name = "failing"

            def validate(self, params, ctx):
                pass

            def context(self, params, ctx):
                return ctx

            def apply(self, pipe_, params, others):
                assert self_name in others  # this lever was applied first
                raise RuntimeError("failed after it")

        self_name = self.lever.name
        items = Config.items
        monkeypatch.setattr(Config, "items", lambda cfg: [*items(cfg), (Failing(), None)])
        with pytest.raises(RuntimeError, match="failed after it"):
            optimize.accelerate(pipe, self.config(pipe)).apply()
        monkeypatch.undo()
        np.testing.assert_array_equal(generate(pipe, PROMPT, STEPS), baseline)
        assert_clean(pipe)

    # -- search and storage --------------------------------------------------------------------------
    def test_the_search_draws_only_valid_params_that_round_trip(self, pipe):
        ctx = context(pipe, steps=20)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        drawn = 0
        for _ in range(40):
            trial = study.ask()
            params = self.lever.suggest(trial, ctx)
            study.tell(trial, 0.0)
            if params is None:
                continue
            drawn += 1
            self.lever.validate(params, ctx)
            config = Config(**{self.lever.name: params})
            assert Config.from_params(config.to_params()) == config
            assert set(trial.params) == {self.lever.name, *self.lever.keys()}
        assert drawn > 5
        assert self.lever in LEVERS
