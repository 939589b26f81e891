"""The task seam, after peft's ``TaskType`` plus one model class per task: a task says how to load
its model, which peft task type wraps it, how to encode one example, the loss of each example
(reduced to one number per example before Opacus' batch mean, so clipping bounds one record),
and how to evaluate (a dict of metrics; ``accuracy`` is always its primary metric)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpeft.config import AdapterConfig, ModelConfig


class Examples(NamedTuple):
    """A site's (or the server's) examples: input texts, class labels (classification; for a
    generative task the class the example is about when known, else 0) and target texts
    (generative tasks: the responses; empty for classification)."""

    texts: list[str]
    labels: list[int]
    targets: tuple[str, ...] | list[str] = ()


class Task(ABC):
    """One kind of model and objective (classification, causal language modelling)."""

    name: ClassVar[str]
    peft_task_type: ClassVar[str]  # peft's TaskType value
    metric_label: ClassVar[str] = "accuracy"  # what ``accuracy`` means for this task, for plots and reports

    @abstractmethod
    def load_model(self, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
        """The frozen base model, bitwise identical on every party for the same config."""

    @abstractmethod
    def tokenizer(self, cfg: ModelConfig) -> PreTrainedTokenizerBase:
        """The model's tokenizer (cached per process)."""

    @abstractmethod
    def encode(self, cfg: ModelConfig, examples: Examples) -> TensorDataset:
        """Token tensors ``(ids, attention mask, labels)`` for ``examples``."""

    @abstractmethod
    def per_example_loss(self, model: nn.Module, batch: Sequence[torch.Tensor], *, device: torch.device,
                         start: Mapping[str, Any], precision: str) -> torch.Tensor:
        """One float32 loss per example of ``batch`` (shape ``[n]``)."""

    def batch_loss(self, model: nn.Module, batch: Sequence[torch.Tensor], *, device: torch.device,
                   start: Mapping[str, Any], precision: str, criterion: nn.Module | None = None
                   ) -> tuple[torch.Tensor, int]:
        """The batch mean of the per-example losses, and the batch size (what backward sees)."""
        per = self.per_example_loss(model, batch, device=device, start=start, precision=precision)
        return per.mean(), int(per.shape[0])

    @abstractmethod
    def evaluate(self, model: nn.Module, data: TensorDataset, *, device: torch.device, precision: str,
                 num_labels: int, cfg: ModelConfig | None = None) -> dict[str, float]:
        """Held-out metrics: always ``accuracy`` (the primary metric), ``loss`` and ``examples``."""

    def lora_targets(self, model_cfg: ModelConfig, adapter: AdapterConfig) -> list[str] | None:
        """Module names LoRA adapts (None: peft's default for the architecture)."""
        return adapter.target_module_list

    def prefix_start(self, model_cfg: ModelConfig, adapter: AdapterConfig) -> int:
        """First adapted layer when the layers below are frozen and this task can cache them, else 0."""
        return 0

    def ffn_start(self, model_cfg: ModelConfig, adapter: AdapterConfig) -> bool:
        return False

    def compute_prefix(self, model: nn.Module, data: TensorDataset, *, start_layer: int, ffn_start: bool,
                       precision: str) -> TensorDataset:
        raise NotImplementedError(f"task {self.name!r} has no frozen-prefix cache")

    def empty_metrics(self) -> dict[str, float]:
        nan = float("nan")
        return {"accuracy": nan, "loss": nan, "examples": 0.0}
