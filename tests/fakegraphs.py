"""A CPU stand-in for CUDA graphs (tests of optimize.runtime.graphs and of every lever's step kinds).

A CUDA graph replays kernels and runs no Python. The fake backend emulates that as closely as a CPU
allows: a capture runs the step once (the levers' Python runs, as at a real capture); a replay
recomputes the step and writes every result into the tensors the capture produced, in place (a real
replay writes into the same addresses), so a later step reads a cache through the tensor objects that
the capture handed over, never through what the replay's Python stored.
"""

from __future__ import annotations

import torch


def _copy_into(old, new):
    if isinstance(old, torch.Tensor):
        old.copy_(new)
    elif isinstance(old, dict):
        for k, v in old.items():
            _copy_into(v, new[k])
    elif isinstance(old, (tuple, list)):
        for a, b in zip(old, new):
            _copy_into(a, b)


def _written(before, after):
    """The tensors a capture wrote into a slot: new objects (a dict's new entries)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return {k: v for k, v in after.items() if before.get(k) is not v}
    return None if after is before else after


class FakeGraph:
    def __init__(self, run, output, slots, before, backend):
        self.run, self.output, self.slots, self.backend = run, output, slots, backend
        self.before = before  # a real graph reads the tensors the slots held at capture
        # and writes only the memory it wrote at capture
        self.written = [_written(b, s.get()) for s, b in zip(slots, before)]

    def replay(self):
        self.backend.replays += 1
        current = [s.get() for s in self.slots]
        for slot, value in zip(self.slots, self.before):
            slot.set(value)
        with torch.no_grad():
            fresh = self.run()
            _copy_into(self.output, fresh)
            for slot, old in zip(self.slots, self.written):
                if old is not None:
                    new = slot.get()
                    _copy_into(old, {k: new[k] for k in old} if isinstance(old, dict) else new)
        for slot, value in zip(self.slots, current):  # the replay's Python effects are not real
            slot.set(value)


class FakeBackend:
    """Capture = run once (random draws undone); replay = recompute into the captured tensors."""

    def __init__(self):
        self.warmups = self.captures = self.replays = 0

    def warmup(self, run):
        self.warmups += 1
        run()

    def capture(self, run, generators, slots):
        self.captures += 1
        # a real capture executes nothing: a registered generator advances at the replay only
        states = [g.get_state() for g in generators]
        before = [s.get() for s in slots]
        output = run()
        for g, state in zip(generators, states):
            g.set_state(state)
        return FakeGraph(run, output, list(slots), before, self), output
