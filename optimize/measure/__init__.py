"""Measuring one configuration: the timing protocol and the scoring pass (:mod:`.evaluator`), CLIP
score and fidelity to the baseline images (:mod:`.metrics`), paired intervals (:mod:`.uncertainty`)
and the prompts (:mod:`.prompts`: COCO, files, the testbed's captions).

Example:
    >>> from optimize.measure import default_rounds
    >>> default_rounds("cuda", "graphs")
    (3, 5)
"""

from .evaluator import Evaluator, GenerationSettings, Measurement, Timing, default_rounds, pin_cpu_threads
from .metrics import ClipScorer, FidelityScorer, MetricError, score_loss, testbed_scorer
from .prompts import PromptsError, load_heldout, load_prompts
from .uncertainty import intervals

__all__ = ["ClipScorer", "Evaluator", "FidelityScorer", "GenerationSettings", "Measurement", "MetricError",
           "PromptsError", "Timing", "default_rounds", "intervals", "load_heldout", "load_prompts", "pin_cpu_threads",
           "score_loss",
           "testbed_scorer"]
