"""Continual-learning tasks: the embedded digits benchmark and the real-data loader.

``build_tasks(preset, seed, vocab)`` returns the six digits tasks keyed by id; ``ORDERS`` and
``order_names`` give the training orders of ALGORITHM.md §5.
"""

from .base import ERROR_TYPES, Example, Task, Verdict
from .digits import ORDERS, PAPER_NAMES, PRESETS, TASK_NAMES, build_tasks, describe_example, order_names

__all__ = [
    "ERROR_TYPES", "Example", "Task", "Verdict",
    "ORDERS", "PAPER_NAMES", "PRESETS", "TASK_NAMES", "build_tasks", "describe_example", "order_names",
]
