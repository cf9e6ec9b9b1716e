"""Execution modes: run the UNet eagerly, replayed from CUDA graphs, or compiled and replayed.

At batch 1 an SD UNet step on a large GPU is mostly kernel launches: replaying the step from a CUDA
graph removes them (docs/benchmarks.md: on an H200 the SD1.5 graph baseline is 2.1-3.0x the eager
one, DeepCache N=5 7-10x). A CUDA graph bakes in every decision Python took while it was captured,
and levers decide per step in Python (DeepCache: full or partial step; T-GATE: which attention
caches or reuses, whether the CFG half is dropped). So :class:`StepGraphs` keeps **one graph per step
kind**: before each UNet call it asks the levers which kind of step comes (``kind``), and replays that
kind's graph, capturing it the first time. Four rules make replay compute what eager computes:

* **Static inputs.** Every tensor argument is copied into the graph's own input buffer before a
  replay; the output is cloned out, since the next replay overwrites it.
* **State hand-over.** Caches the methods keep between steps (DeepCache's block outputs, T-GATE's
  attention outputs) are written by one kind's graph and read by another's. At capture they are
  tensors of the writing graph's memory, which every replay refreshes in place. ``slots`` name that
  state: after a replay, what the kind's capture *changed* there (a slot, or a dict's entries) is set
  back to what the capture left, exactly as the eager step would have; what it left alone stays as
  the last writer left it (a DeepCache partial step does not run the deep attentions, so it must not
  hand back their T-GATE caches as of its own capture). This also lets a later capture read the
  right tensors.
* **Fixed addresses.** A graph reads a cache at the address it had at capture. When another graph
  wrote that cache last (T-GATE's caches are written by full and partial DeepCache steps alike), the
  current tensor is copied into the captured one before the replay. Which caches exist, and their
  shapes, are part of the kind: the methods decide in Python whether a cache is there to reuse.
* **Nothing Python does inside a step is repeated by a replay.** Warm-up runs before capture change
  the same state and draw random numbers, so the state (``slots``) and the random generators
  (``generators``, registered with every graph) are restored before the capture.

A kind is captured per input shape too: T-GATE halves the batch at its gate, a short last batch has
fewer images. The graphs live as long as the configuration: :meth:`StepGraphs.close` frees them.
The text encoders are replayed by :class:`PipelineGraphs`, one graph per input shape, shared by
every configuration of a study; it also keeps the schedule on the host, so no step waits for the
GPU. The scheduler's arithmetic, the pipeline's own loop and the VAE decode stay eager.

Example:
    >>> graphs = StepGraphs(pipe.unet)                           # doctest: +SKIP
    >>> with graphs.installed():                                 # doctest: +SKIP
    ...     image = pipe("a red fox", num_inference_steps=50).images[0]   # replays one graph per step
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

EXEC_MODES = ("eager", "graphs", "compile")
_MISSING = object()


class GraphUnsupported(RuntimeError):
    """A configuration or pipeline that cannot run in a graph mode (the trial fails with this reason)."""


def check_exec(mode: str, device: str) -> None:
    """Raise ``ValueError`` for a mode this device cannot run; call before anything loads."""
    if mode not in EXEC_MODES:
        raise ValueError(f"--exec must be one of {', '.join(EXEC_MODES)}, got {mode!r}")
    if mode != "eager" and not str(device).startswith("cuda"):
        raise ValueError(f"--exec {mode} needs a CUDA device (got --device {device}); use --exec eager")


@dataclass(frozen=True)
class Slot:
    """State a method keeps between UNet calls: how to read it and how to set it back. ``decides``:
    whether the method's Python branches on which of its tensors exist (then that is part of the kind)."""

    get: Callable[[], Any]
    set: Callable[[Any], None]
    decides: bool = False


def attr_slot(obj, name: str, decides: bool = False) -> Slot:
    """A :class:`Slot` over ``obj.name`` (absent attributes stay absent)."""

    def set_(value):
        if value is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = value

    return Slot(lambda: obj.__dict__.get(name, _MISSING), set_, decides)


def dict_slot(get_dict: Callable[[], dict], set_dict: Callable[[dict], None]) -> Slot:
    """A :class:`Slot` over a dict attribute, copied so a later change does not alias the snapshot."""
    return Slot(lambda: dict(get_dict()), lambda value: set_dict(dict(value)))


class CudaBackend:
    """Warm-up on a side stream, capture and replay with ``torch.cuda.CUDAGraph``."""

    def warmup(self, run: Callable[[], Any]) -> None:
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, run: Callable[[], Any], generators: Sequence, slots: Sequence[Slot]):
        import torch

        graph = torch.cuda.CUDAGraph()
        for generator in generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            output = run()
        return graph, output


@dataclass
class _Graph:
    handle: Any  # has .replay()
    inputs: list  # static input buffers, in the order of the tensor leaves
    output: Any  # static output (a pytree of tensors)
    changes: list  # per slot: None (untouched), ("set", value) or ("update", {key: value}) of a dict
    reads: list  # per slot: the tensors it held at capture, {entry: tensor} (the addresses the graph reads)
    replays: int = 0


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    capture_seconds: float = 0.0
    kinds: list = field(default_factory=list)  # the key of every call, in order (tests read it)


class _Installable:
    """Itself in place of ``module.forward`` while installed (``with x.installed():``); ``wrapped`` is the
    forward it found there (the module's own, normally), ``None`` while not installed."""

    module: Any
    wrapped: Callable | None = None
    _previous: Any = _MISSING

    def install(self):
        if self.wrapped is not None:
            raise RuntimeError(f"{type(self).__name__} already installed")
        self.wrapped = self.module.forward
        self._previous = _take_forward(self.module, self)
        return self

    def uninstall(self) -> None:
        if self.wrapped is None:
            return
        _give_back_forward(self.module, self, self._previous)
        self.wrapped, self._previous = None, _MISSING

    @contextmanager
    def installed(self):
        """Installed for the block (StepGraphs: the module's calls go to the graphs, whatever forward
        it has now)."""
        self.install()
        try:
            yield self
        finally:
            self.uninstall()


def _take_forward(module, replacement):
    """Make ``replacement`` the module's instance-level ``forward``; returns what to give back."""
    previous = module.__dict__.get("forward", _MISSING)
    module.__dict__["forward"] = replacement
    return previous


def _give_back_forward(module, replacement, previous) -> None:
    """Undo :func:`_take_forward`, if ``replacement`` is still the forward (a wrapper installed on top
    of it is its owner's to remove)."""
    if module.__dict__.get("forward") is replacement:
        if previous is _MISSING:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = previous


class Step(_Installable):
    """The module's own forward behind one indirection, installed before anything wraps the module, so
    it stays beneath every wrapper (DeepCache's step counter, :class:`StepGraphs`' replays).

    Before each step it calls ``decide``: the levers settle the coming step's kind there, from their
    own state, and freeze it where their Python inside the forward reads it (DeepCache: full or
    partial step). What runs beneath, ``compute`` (the forward, or what a lever put in its place: a
    compiled forward), then sees one decision per kind: Dynamo traces one graph per kind, not one per
    step, and a graph mode's capture bakes in the decision its kind names.
    """

    def __init__(self, module, decide: Callable[[], Any] = lambda: None):
        self.module, self.decide = module, decide
        self.compute = None

    @property
    def own(self) -> Callable | None:
        """The module's forward as it was installed over (its own, normally)."""
        return self.wrapped

    def install(self) -> "Step":
        super().install()
        self.compute = self.wrapped
        return self

    def uninstall(self) -> None:
        super().uninstall()
        self.compute = None

    def __call__(self, *args, **kwargs):
        self.decide()
        return self.compute(*args, **kwargs)


class StepGraphs(_Installable):
    """One CUDA graph per step kind and input shape, replacing ``module.forward`` while installed.

    ``kind`` returns a hashable label of the coming step from the methods' own state (called once per
    UNet call, before the step); ``slots`` is the state handed between kinds (module docstring);
    ``generators`` the random generators a step draws from; ``capture_allowed`` may refuse a capture
    (the untouched pipeline's graphs must be captured untouched). ``backend`` defaults to CUDA.
    """

    def __init__(self, module, kind: Callable[[], Hashable] = lambda: (), slots: Callable[[], Sequence[Slot]] = list,
                 generators: Callable[[], Sequence] = list, backend=None,
                 capture_allowed: Callable[[], str | None] = lambda: None, record_kinds: bool = False):
        self.module = module
        self.kind, self.slots, self.generators = kind, slots, generators
        self.capture_allowed = capture_allowed
        self.backend = backend if backend is not None else CudaBackend()
        self.graphs: dict[Hashable, _Graph] = {}
        self.stats = GraphStats()
        self.record_kinds = record_kinds

    # -- installing (the graphs capture ``wrapped``: the UNet's own forward, normally) -----------------
    @property
    def is_installed(self) -> bool:
        return self.wrapped is not None

    def close(self) -> None:
        """Uninstall and free every graph (their memory returns to the allocator)."""
        self.uninstall()
        self.graphs.clear()

    # -- calls ---------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        import torch
        from torch.utils._pytree import tree_flatten, tree_map

        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        meta = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else _hashable(x)
                     for x in leaves)
        slots = self.slots()
        state = [_entries(slot.get()) for slot in slots]
        signature = tuple(tuple(sorted(((k, tuple(t.shape)) for k, t in entries.items()), key=repr))
                          for slot, entries in zip(slots, state) if slot.decides)
        key = (self.kind(), str(spec), meta, signature)
        if self.record_kinds:
            self.stats.kinds.append(key[0])
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(leaves, spec)
        for buffer, x in zip(graph.inputs, tensors):
            if x.device != buffer.device:  # a host timestep (PipelineGraphs): pinned, so no synchronize
                buffer.copy_(x.pin_memory() if buffer.is_cuda else x, non_blocking=True)
            else:
                buffer.copy_(x)
        for entries, reads in zip(state, graph.reads):
            for k, captured in reads.items():
                if entries[k] is not captured:  # another graph wrote it last
                    captured.copy_(entries[k])
        graph.handle.replay()
        graph.replays += 1
        self.stats.replays += 1
        for slot, change in zip(slots, graph.changes):
            if change is None:
                continue
            how, value = change
            if how == "update":
                value = {**slot.get(), **value}
            slot.set(value)
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, graph.output)

    def _capture(self, leaves: list, spec) -> _Graph:
        import time

        import torch
        from torch.utils._pytree import tree_unflatten

        refused = self.capture_allowed()
        if refused:
            raise GraphUnsupported(refused)
        start = time.perf_counter()
        # a CPU tensor for a module on the GPU (the host schedule's timestep) gets a buffer there
        param = next(self.module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        static = [(x.to(device, copy=True) if x.device.type == "cpu" else x.clone()) if isinstance(x, torch.Tensor)
                  else x for x in leaves]
        args, kwargs = tree_unflatten(static, spec)
        forward = self.wrapped

        def run():
            return forward(*args, **kwargs)

        slots, generators = list(self.slots()), list(self.generators())
        before = [slot.get() for slot in slots]
        rng = [g.get_state() for g in generators]
        try:
            self.backend.warmup(run)
        finally:  # the warm-up's side effects are not the step's: the capture redoes them
            for slot, value in zip(slots, before):
                slot.set(value)
            for g, state in zip(generators, rng):
                g.set_state(state)
        try:
            handle, output = self.backend.capture(run, generators, slots)
        except GraphUnsupported:
            raise
        except Exception as e:  # e.g. a host synchronize inside the step: the trial fails with why
            raise GraphUnsupported(f"capturing {type(self.module).__name__}.forward failed: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        inputs = [x for x in static if isinstance(x, torch.Tensor)]
        graph = _Graph(handle, inputs, output, [_change(b, slot.get()) for slot, b in zip(slots, before)],
                       [_entries(b) for b in before])
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - start
        return graph


class PipelineGraphs(_Installable):
    """The rest of the pipeline in a graph mode: each text encoder's ``forward`` replayed from one graph
    per input shape, and the denoising schedule kept on the host. No acceleration touches either, so
    one instance serves the untouched pipeline and every configuration of a study.

    * Prompt encoding is launch-bound: 16.9 ms eager vs 2.5 ms graphed on SD1.5, 39 vs 12 ms for
      SDXL's two encoders (H200, docs/benchmarks.md). The VAE decode is not: graphed it took what it
      takes eagerly (SDXL 1024: 121.9 vs 122.1 ms), so it stays eager.
    * The schedule on the host: diffusers puts the timesteps on the GPU, and DDIM's ``step`` indexes
      its CPU table with that GPU timestep and tests ``prev_timestep >= 0``: a synchronize every
      step, after which the host's Python for the next step runs while the GPU idles. With the
      timesteps on the CPU (``set_timesteps`` without a device) the host runs ahead of the replays;
      the UNet graphs take the timestep into their input buffer without a synchronize. The values
      are the same, so is the output.

    Installing is re-entrant: the baseline's calls inside a configuration's measurement share it.
    """

    def __init__(self, pipe, backend=None):
        self.pipe = pipe
        self.backend = backend
        self.parts: list[StepGraphs] = []
        self._depth = 0
        self._scheduler = None

    @property
    def stats(self) -> GraphStats:
        out = GraphStats()
        for part in self.parts:
            out.captures += part.stats.captures
            out.replays += part.stats.replays
            out.capture_seconds += part.stats.capture_seconds
        return out

    def install(self) -> "PipelineGraphs":
        if self._depth == 0:
            if not self.parts:
                self.parts = [StepGraphs(encoder, backend=self.backend)
                              for encoder in (getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2"))
                              if encoder is not None]
            for part in self.parts:
                part.install()
            self._host_schedule()
        self._depth += 1
        return self

    def _host_schedule(self) -> None:
        self._scheduler = _schedule_on_host(self.pipe)

    @contextmanager
    def host_schedule(self):
        """The schedule on the host for the scheduler the pipeline has now, for one call: a lever may
        swap in another solver for the call (optimize.levers.schedule)."""
        wrapped = _schedule_on_host(self.pipe)
        try:
            yield
        finally:
            if wrapped is not None:
                wrapped.__dict__.pop("set_timesteps", None)

    def uninstall(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            for part in self.parts:
                part.uninstall()
            if self._scheduler is not None:
                self._scheduler.__dict__.pop("set_timesteps", None)
                self._scheduler = None

    def close(self) -> None:
        """Uninstall and free every graph."""
        self._depth = min(self._depth, 1)
        self.uninstall()
        for part in self.parts:
            part.close()
        self.parts = []


def _schedule_on_host(pipe):
    """Make ``pipe.scheduler`` put its timesteps on the CPU (PipelineGraphs' docstring says why);
    returns the scheduler it wrapped, or None (no scheduler, or wrapped already)."""
    import functools

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or "set_timesteps" in scheduler.__dict__:
        return None
    original = scheduler.set_timesteps

    @functools.wraps(original)  # retrieve_timesteps reads its signature
    def set_timesteps(*args, **kwargs):
        if len(args) >= 2:
            args = (args[0], None, *args[2:])
        else:
            kwargs["device"] = None
        return original(*args, **kwargs)

    scheduler.__dict__["set_timesteps"] = set_timesteps
    return scheduler


def _entries(value) -> dict:
    """The tensors a slot holds, by path: the value itself, or a dict's entries (DeepCache keeps
    tuples of tensors there). Hand-rolled: it runs on every step."""
    import torch

    if isinstance(value, torch.Tensor):
        return {(): value}
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, torch.Tensor):
                out[(k,)] = v
            elif isinstance(v, (tuple, list)):
                out.update(((k, i), x) for i, x in enumerate(v) if isinstance(x, torch.Tensor))
    return out


def _change(before, after):
    """What a capture did to one slot: nothing, a new value, or new entries of a dict (by identity:
    a graph's tensors are new objects)."""
    if isinstance(before, dict) and isinstance(after, dict):
        delta = {k: v for k, v in after.items() if before.get(k, _MISSING) is not v}
        return ("update", delta) if delta else None
    return None if after is before else ("set", after)


def _hashable(x):
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def compile_blocks(unet) -> int:
    """Regional compile, what ``--exec compile`` does at load (kept so its studies resume as they were
    made): ``torch.compile`` each repeated block of the UNet once, for the baseline and every trial;
    graphs are captured on top. Returns the number of blocks."""
    import torch

    names = set(getattr(unet, "_repeated_blocks", ()) or ("BasicTransformerBlock",)) | {"ResnetBlock2D"}
    count = 0
    for module in unet.modules():
        if type(module).__name__ in names:
            module.compile(fullgraph=False, dynamic=False)
            count += 1
    # per-step kinds (T-GATE's attention flags, ToMe's block class) are recompiles: allow them
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return count
