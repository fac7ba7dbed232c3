"""Offline, seeded long-context tasks with token-exact lengths (RULER, Landmark attention passkey, fidelity)."""

from adaptive_kv.tasks.base import PieceEncoder, Task, TaskSample
from adaptive_kv.tasks.common_words import CommonWordsTask
from adaptive_kv.tasks.fidelity import FidelityTask
from adaptive_kv.tasks.logit_metrics import kl_divergence, perplexity, top1_agreement
from adaptive_kv.tasks.niah import NiahTask, NiahVariant
from adaptive_kv.tasks.passkey import PasskeyTask
from adaptive_kv.tasks.registry import TASKS, get_task, make_samples
from adaptive_kv.tasks.scoring import METRICS, clean_prediction, passkey_match, score_sample, string_match_all
from adaptive_kv.tasks.variable_tracking import VariableTrackingTask

__all__ = [
    "METRICS",
    "TASKS",
    "CommonWordsTask",
    "FidelityTask",
    "NiahTask",
    "NiahVariant",
    "PasskeyTask",
    "PieceEncoder",
    "Task",
    "TaskSample",
    "VariableTrackingTask",
    "clean_prediction",
    "get_task",
    "kl_divergence",
    "make_samples",
    "passkey_match",
    "perplexity",
    "score_sample",
    "string_match_all",
    "top1_agreement",
]
