"""The baseline: the untouched pipeline, measured once per study and stored in it.

A study's speedups and losses are relative to its baseline, so the baseline is stored together with
everything it depends on (its *fingerprint*). A resumed run reuses it; a run whose settings differ
from the fingerprint is refused, naming the difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .storage import insert_study_user_attr_once

ATTR = "baseline"  # the study user attr holding asdict(Baseline)


class BaselineMismatch(ValueError):
    pass


@dataclass
class Baseline:
    time_per_image: float
    spread: float
    clip_score: float
    scores: list[float]
    fingerprint: dict[str, Any]
    height: int
    width: int
    samples: list[float] = field(default_factory=list)
    # prompts per call of the scoring pass its images were made with (each prompt with its own seed):
    # trials must score the same way for their images to compare exactly. None: a study from before it
    # was stored, scored in calls of its batch size with one generator per call (measure.Evaluator)
    score_batch: int | None = None

    @classmethod
    def from_measurement(cls, m, settings, fingerprint: dict[str, Any], score_batch: int | None = None) -> "Baseline":
        return cls(m.timing.best, m.timing.spread, m.clip_score, [float(x) for x in m.scores],
                   dict(fingerprint), settings.height, settings.width, m.timing.samples, score_batch)

    def save(self, study) -> None:
        study.set_user_attr(ATTR, asdict(self))

    def insert_once(self, storage, study) -> bool:
        """Store this baseline unless the study has one; True if this call stored it."""
        return insert_study_user_attr_once(storage, study._study_id, ATTR, asdict(self))

    @classmethod
    def load(cls, study) -> "Baseline | None":
        data = study.user_attrs.get(ATTR)
        return cls(**data) if data else None


def check_fingerprint(stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`BaselineMismatch` naming every setting that differs from the stored baseline."""
    diffs = [f"{k}={stored.get(k)!r} (now {current.get(k)!r})" for k in sorted(set(stored) | set(current))
             if stored.get(k) != current.get(k)]
    if diffs:
        raise BaselineMismatch(
            "this study's baseline was measured with other settings: " + ", ".join(diffs)
            + "; use the same settings or another --study"
        )
