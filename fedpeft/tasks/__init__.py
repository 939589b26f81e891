"""Tasks: one registry (``task=`` in the run config), one class per task."""

from __future__ import annotations

from fedpeft.config import TASK_NAMES, ModelConfig
from fedpeft.registry import Registry
from fedpeft.tasks.base import Examples, Task
from fedpeft.tasks.causal_lm import CausalLM
from fedpeft.tasks.classification import Classification

__all__ = ["TASKS", "Examples", "Task", "task_of"]

TASKS: Registry[Task] = Registry("task", "task")
TASKS.add(Classification.name, Classification())
TASKS.add(CausalLM.name, CausalLM())
assert set(TASKS.names()) == set(TASK_NAMES), "config.TASK_NAMES must list the registered tasks"


def task_of(cfg: ModelConfig) -> Task:
    """The task a model config names (``task=``)."""
    return TASKS.get(cfg.task)
