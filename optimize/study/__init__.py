"""What is stored: every study and trial key and the goal (:mod:`.record`), the baseline and its
fingerprint, the Optuna storage (SQLite, PostgreSQL) with its heartbeats and retries, which process
runs a trial, the images kept as artifacts, and crash-safe files. Below measurement and search: it
knows the names of the losses, not how they are measured.

Example:
    >>> from optimize.study import Goal
    >>> Goal("max", None, 0.02).slug
    'max-loss0.02'
"""

from .baseline import Baseline, BaselineMismatch
from .record import (Fingerprint, Goal, StudyError, StudyRecord, Validation, best_feasible, goal_of, is_feasible,
                     open_study, pareto_front, study_result)
from .storage import StorageError, open_storage, redact

__all__ = ["Baseline", "BaselineMismatch", "Fingerprint", "Goal", "StorageError", "StudyError", "StudyRecord",
           "Validation", "best_feasible", "goal_of", "is_feasible", "open_storage", "open_study", "pareto_front",
           "redact", "study_result"]
