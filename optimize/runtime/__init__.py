"""The bottom layer: what runs a pipeline. Loading (presets, local directories, the offline testbed,
schedulers), the execution modes (CUDA graphs per step kind, regional compile), ``torch.compile`` as a
run uses it (:mod:`.compiling`) and message text.
Nothing here knows about levers, measurements or studies.

Example:
    >>> from optimize.runtime import SCHEDULERS
    >>> sorted(SCHEDULERS)[:3]
    ['ddim', 'dpm++', 'dpm++karras']
"""

from . import testbed
from .graphs import EXEC_MODES, GraphUnsupported, PipelineGraphs, StepGraphs, check_exec
from .pipelines import SCHEDULERS, PipelineError, PipeSpec, load_pipeline, resolve_pipe, scheduler_for, set_scheduler

__all__ = ["EXEC_MODES", "GraphUnsupported", "PipeSpec", "PipelineError", "PipelineGraphs", "SCHEDULERS", "StepGraphs",
           "check_exec", "load_pipeline", "resolve_pipe", "scheduler_for", "set_scheduler", "testbed"]
