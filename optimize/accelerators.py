"""Training-free accelerations applied to an already-loaded pipeline, and removed again.

Three methods, each optional:

* **DeepCache** (``DeepCacheSDHelper``): recompute the deep UNet blocks only every ``cache_interval``
  steps and reuse their output in between; ``cache_branch_id`` picks the skip branch (higher = less
  cached).
* **ToMe** (``tomesd``): merge redundant tokens before self-attention.
* **T-GATE** (``tgate`` v2): stop cross-attention after ``gate_step`` (dropping the CFG batch half) and
  reuse self-attention every ``sp_interval`` / ``fi_interval`` steps after ``warm_up``.

The libraries leave state behind that breaks later calls and removal (see the comments below), so
:class:`Accelerated` owns the whole life cycle: it snapshots what it will touch, resets per-call state
before *every* call, and restores the pipeline exactly, so that after removal the output is
bit-identical to the untouched pipeline.

Example:
    >>> cfg = Config.from_params({"deepcache": True, "deepcache.cache_interval": 3})
    >>> with accelerate(pipe, cfg) as fast:                     # doctest: +SKIP
    ...     image = fast("a red fox in the snow", num_inference_steps=50).images[0]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .graphs import EXEC_MODES, GraphUnsupported, PipelineGraphs, StepGraphs, attr_slot, dict_slot
from .pipelines import default_guidance, is_xl

METHODS = ("deepcache", "tome", "tgate")
TOME_DOWNSAMPLES = (1, 2, 4, 8)
# Module attributes the three libraries add; anything in this list that a module did not have before
# `apply` is deleted on `remove` (tomesd leaves `_tome_info`/`use_ada_layer_norm*`, T-GATE `cache`,
# DeepCache and T-GATE instance-level `forward`s).
_TOUCHED_ATTRS = ("forward", "cache", "_tome_info", "use_ada_layer_norm", "use_ada_layer_norm_zero")
_MISSING = object()


class InvalidConfig(ValueError):
    """A configuration the libraries would crash on or silently ignore."""


@dataclass(frozen=True)
class DeepCache:
    cache_interval: int = 3
    cache_branch_id: int = 0


@dataclass(frozen=True)
class ToMe:
    ratio: float = 0.5
    max_downsample: int = 1


@dataclass(frozen=True)
class TGate:
    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2


_CLASSES = {"deepcache": DeepCache, "tome": ToMe, "tgate": TGate}


@dataclass(frozen=True)
class Config:
    """Which methods are on, with their parameters (``None`` = off)."""

    deepcache: DeepCache | None = None
    tome: ToMe | None = None
    tgate: TGate | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Config":
        """Build from flat params as Optuna stores them: ``{"deepcache": True, "deepcache.cache_interval": 3}``.

        A method whose switch is missing is on if any of its parameters is given.
        """
        known = set(METHODS) | {f"{m}.{f.name}" for m, c in _CLASSES.items() for f in fields(c)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidConfig(f"unknown parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        kwargs = {}
        for method, klass in _CLASSES.items():
            sub = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(method + ".")}
            on = params.get(method, bool(sub))
            if not isinstance(on, bool):
                raise InvalidConfig(f"{method} must be true or false, got {on!r}")
            kwargs[method] = klass(**sub) if on else None
        return cls(**kwargs)

    def to_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for method in METHODS:
            value = getattr(self, method)
            out[method] = value is not None
            if value is not None:
                out.update({f"{method}.{k}": v for k, v in asdict(value).items()})
        return out

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHODS if getattr(self, m) is not None)

    def label(self) -> str:
        """Short human label, e.g. ``dc(3,b0)+tome(0.5,md2)+tgate(10,sp5,fi1,w2)``."""
        parts = []
        if self.deepcache:
            parts.append(f"dc({self.deepcache.cache_interval},b{self.deepcache.cache_branch_id})")
        if self.tome:
            parts.append(f"tome({self.tome.ratio:g},md{self.tome.max_downsample})")
        if self.tgate:
            g = self.tgate
            parts.append(f"tgate({g.gate_step},sp{g.sp_interval},fi{g.fi_interval},w{g.warm_up})")
        return "+".join(parts) or "baseline"

    def validate(self, pipe=None, num_inference_steps: int | None = None, guidance_scale: float | None = None) -> None:
        """Raise :class:`InvalidConfig` for values the libraries crash on or silently ignore."""
        if self.deepcache:
            d = self.deepcache
            _int_at_least("deepcache.cache_interval", d.cache_interval, 1)
            _int_at_least("deepcache.cache_branch_id", d.cache_branch_id, 0)
            if pipe is not None and d.cache_branch_id > max_branch_id(pipe):
                raise InvalidConfig(
                    f"deepcache.cache_branch_id must be in 0..{max_branch_id(pipe)} for this UNet, got {d.cache_branch_id}"
                )
        if self.tome:
            t = self.tome
            if not isinstance(t.ratio, (int, float)) or not 0 < t.ratio < 1:
                raise InvalidConfig(f"tome.ratio must be in (0, 1), got {t.ratio!r}")
            if t.max_downsample not in TOME_DOWNSAMPLES:
                raise InvalidConfig(f"tome.max_downsample must be one of {TOME_DOWNSAMPLES}, got {t.max_downsample!r}")
            if pipe is not None and t.max_downsample == 1 and hasattr(pipe, "text_encoder_2"):
                raise InvalidConfig("tome.max_downsample=1 does nothing on SDXL (no attention at full resolution): use 2, 4 or 8")
        if self.tgate:
            g = self.tgate
            # gate_step 0 reuses the cross-attention cache of the previous call; interval 0 divides by zero.
            _int_at_least("tgate.gate_step", g.gate_step, 1)
            _int_at_least("tgate.sp_interval", g.sp_interval, 1)
            _int_at_least("tgate.fi_interval", g.fi_interval, 1)
            _int_at_least("tgate.warm_up", g.warm_up, 0)
            if g.warm_up >= g.gate_step:
                raise InvalidConfig(f"tgate.warm_up ({g.warm_up}) must be smaller than tgate.gate_step ({g.gate_step})")
            if num_inference_steps is not None and g.gate_step >= num_inference_steps:
                raise InvalidConfig(
                    f"tgate.gate_step ({g.gate_step}) must be smaller than the number of steps ({num_inference_steps})"
                )
            if guidance_scale is not None and guidance_scale <= 1:
                raise InvalidConfig("T-GATE needs classifier-free guidance (guidance scale > 1)")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidConfig(f"{name} must be an integer >= {low}, got {value!r}")


def max_branch_id(pipe) -> int:
    """Largest DeepCache ``cache_branch_id`` for this UNet (DeepCache counts 3 layers per down block)."""
    return 3 * len(pipe.unet.down_blocks) - 1


class Accelerated:
    """A pipeline with a :class:`Config` applied. Call it like the pipeline; use it as a context manager.

    Every call starts from a clean state: T-GATE's per-layer caches, DeepCache's cached features and
    ToMe's random generator are reset first. Without that, the second call of a configuration reuses
    tensors from the end of the first call (where T-GATE has halved the batch) and crashes, or differs
    from the first call.
    """

    def __init__(self, pipe, config: Config, seed: int = 0, exec: str = "eager", graph_backend=None,
                 pipeline_graphs: PipelineGraphs | None = None):
        if exec not in EXEC_MODES:
            raise InvalidConfig(f"exec must be one of {', '.join(EXEC_MODES)}, got {exec!r}")
        self.pipe = pipe
        self.config = config
        self.seed = seed
        self.exec = exec
        self.graph_backend = graph_backend
        self._snapshot: dict[int, tuple[Any, dict[str, Any]]] | None = None
        self._deepcache = None
        self.graphs: StepGraphs | None = None
        # graph modes: the text encoders' graphs and the host schedule; shared when given (a study's), else own
        self._shared_pipeline_graphs = pipeline_graphs is not None
        self.pipeline_graphs = pipeline_graphs
        self._pipeline_installed = False
        self._attention_modules: list | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def apply(self) -> "Accelerated":
        if self._snapshot is not None:
            raise RuntimeError("configuration already applied")  # DeepCache recurses if enabled twice
        if getattr(self.pipe, "_optimize_sd_applied", False):
            raise RuntimeError("another configuration is applied to this pipeline; remove it first")
        self.config.validate(self.pipe)
        pipe, cfg = self.pipe, self.config
        self._snapshot = {
            id(m): (m, {a: m.__dict__.get(a, _MISSING) for a in _TOUCHED_ATTRS}) for m in pipe.unet.modules()
        }
        pipe._optimize_sd_applied = True
        try:
            if self.exec != "eager":
                if pipe.device.type != "cuda" and self.graph_backend is None:
                    raise GraphUnsupported(f"exec {self.exec!r} needs the pipeline on a CUDA device")
                # installed first, so the methods wrap the graphs: DeepCache keeps them as the UNet's
                # forward (also across T-GATE's disable/enable at the gate) and the blocks' Python
                # runs at capture only
                self.graphs = StepGraphs(pipe.unet, kind=self._step_kind, slots=self._slots,
                                         generators=self._generators, backend=self.graph_backend).install()
                if self.pipeline_graphs is None:
                    self.pipeline_graphs = PipelineGraphs(pipe, backend=self.graph_backend)
                self.pipeline_graphs.install()
                self._pipeline_installed = True
            if cfg.tome:
                import tomesd

                tomesd.apply_patch(pipe, ratio=float(cfg.tome.ratio), max_downsample=cfg.tome.max_downsample)
            if cfg.tgate:
                import tgate

                xl = hasattr(pipe, "text_encoder_2")
                if cfg.deepcache:
                    # DeepCache + T-GATE must share one helper: the loader's `tgate` resets the cache
                    # when the CFG half is dropped, a separate helper would feed a stale batch.
                    loader = tgate.TgateSDXLDeepCacheLoader if xl else tgate.TgateSDDeepCacheLoader
                    loader(pipe, cache_interval=cfg.deepcache.cache_interval,
                           cache_branch_id=cfg.deepcache.cache_branch_id)
                    self._deepcache = pipe.deepcache
                else:
                    (tgate.TgateSDXLLoader if xl else tgate.TgateSDLoader)(pipe)
            elif cfg.deepcache:
                from DeepCache import DeepCacheSDHelper

                helper = DeepCacheSDHelper(pipe=pipe)
                helper.set_params(cache_interval=cfg.deepcache.cache_interval,
                                  cache_branch_id=cfg.deepcache.cache_branch_id)
                helper.enable()
                self._deepcache = helper
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Undo everything :meth:`apply` did; safe to call twice or after a failed apply."""
        if self._snapshot is None:
            return
        pipe = self.pipe
        try:
            if self._deepcache is not None and "unet_forward" in getattr(self._deepcache, "function_dict", {}):
                self._deepcache.disable()
            if self.config.tome:
                import tomesd

                tomesd.remove_patch(pipe)
        finally:
            for module, attrs in self._snapshot.values():
                for name, value in attrs.items():
                    if value is _MISSING:
                        module.__dict__.pop(name, None)
                    else:
                        module.__dict__[name] = value
            for name in ("tgate", "deepcache", "_optimize_sd_applied"):
                pipe.__dict__.pop(name, None)
            if self.graphs is not None:
                self.graphs.close()
            if self._pipeline_installed:
                if self._shared_pipeline_graphs:
                    self.pipeline_graphs.uninstall()
                else:
                    self.pipeline_graphs.close()
                    self.pipeline_graphs = None
                self._pipeline_installed = False
            self._snapshot = None
            self._deepcache = None
            self.graphs = None
            self._attention_modules = None

    def __enter__(self) -> "Accelerated":
        return self.apply() if self._snapshot is None else self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- calls -----------------------------------------------------------------------------------
    def reset_state(self) -> None:
        """Forget everything the previous call left in the caches."""
        import torch

        unet = self.pipe.unet
        if self.config.tgate:
            for module in unet.modules():
                if "cache" in module.__dict__:
                    module.cache = None
        if self._deepcache is not None:
            self._deepcache.cached_output = {}
            self._deepcache.cur_timestep = 0
            self._deepcache.start_timestep = None
        if self.config.tome:
            # tomesd forks the global RNG once and keeps advancing it: reseed so calls are reproducible.
            # In place: the graphs of a graph mode hold this very generator.
            args = unet._tome_info["args"]
            if args["generator"] is None or args["generator"].device != unet.device:
                args["generator"] = torch.Generator(device=unet.device)
            args["generator"].manual_seed(self.seed)

    # -- graph modes: what the methods decide per step, and what they hand between steps ---------
    def _step_kind(self) -> tuple:
        """The coming step's kind, read from the methods' own state (see optimize.graphs)."""
        kind = []
        if self._deepcache is not None:
            # the helper's own schedule; like its block wrappers it fixes start_timestep on a call's
            # first step, which a replay (no Python inside) would otherwise never do
            kind.append(("deepcache", "partial" if self._deepcache.is_skip_step(0, 0, "mid") else "full"))
        if self.config.tgate:
            # T-GATE re-registers every Attention's forward per step with its flags as defaults
            flags = {getattr(m.__dict__.get("forward"), "__defaults__", None) for m in self._attentions()}
            kind.append(("tgate", tuple(sorted(flags, key=repr))))
        return tuple(kind)

    def _attentions(self) -> list:
        if self._attention_modules is None:  # asked once per step: walk the UNet once
            self._attention_modules = [m for m in self.pipe.unet.modules() if type(m).__name__ == "Attention"]
        return self._attention_modules

    def _slots(self) -> list:
        slots = []
        if self._deepcache is not None:
            helper = self._deepcache
            slots.append(dict_slot(lambda: helper.cached_output, lambda v: setattr(helper, "cached_output", v)))
        if self.config.tgate:
            # T-GATE reuses a cache only where one is there (`cache != None`): a decision taken in Python
            slots += [attr_slot(m, "cache", decides=True) for m in self._attentions()]
        return slots

    def _generators(self) -> list:
        if not self.config.tome:
            return []
        generator = self.pipe.unet._tome_info["args"]["generator"]
        return [] if generator is None else [generator]

    def __call__(self, *args, **kwargs):
        if self._snapshot is None:
            raise RuntimeError("configuration is not applied (use it as a context manager or call apply())")
        self.reset_state()
        if self.config.tgate:
            g = self.config.tgate
            steps = kwargs.get("num_inference_steps", 50)
            guidance = kwargs.get("guidance_scale", default_guidance(is_xl(self.pipe)))
            self.config.validate(num_inference_steps=steps, guidance_scale=guidance)
            kwargs.update(gate_step=g.gate_step, sp_interval=g.sp_interval, fi_interval=g.fi_interval, warm_up=g.warm_up)
            return self.pipe.tgate(*args, **kwargs)
        return self.pipe(*args, **kwargs)


def accelerate(pipe, params: Config | Mapping[str, Any], seed: int = 0, exec: str = "eager") -> Accelerated:
    """Apply a found configuration to your own pipeline.

    ``params`` is a :class:`Config` or the flat dict stored in a study / ``search_params.json``.
    Use the result as a context manager and call it instead of the pipeline::

        with optimize.accelerate(pipe, best["params"]) as fast:
            images = fast(prompts, num_inference_steps=50).images

    Leaving the block restores the pipeline exactly. ``exec="graphs"`` replays every UNet step from
    CUDA graphs (one per step kind, :mod:`optimize.graphs`) and the text encoders too, with the
    schedule on the host, as a study with ``--exec graphs`` timed it.
    """
    config = params if isinstance(params, Config) else Config.from_params(params)
    return Accelerated(pipe, config, seed=seed, exec=exec)
