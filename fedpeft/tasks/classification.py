"""Sequence classification (the notes triage task): a BERT-style encoder, a head on pooled
states, cross-entropy per note; accuracy and macro-F1 from the argmax."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpeft import models, prefix, training
from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.tasks.base import Examples, Task


class Classification(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    metric_label = "accuracy"

    def load_model(self, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
        return models.load_base_model(cfg, num_labels=len(labels), labels=labels)

    def tokenizer(self, cfg: ModelConfig) -> PreTrainedTokenizerBase:
        return models.load_tokenizer(cfg.name)

    def encode(self, cfg: ModelConfig, examples: Examples) -> TensorDataset:
        return training.encode(examples.texts, examples.labels, self.tokenizer(cfg), max_length=cfg.max_length)

    def per_example_loss(self, model: nn.Module, batch: Sequence[torch.Tensor], *, device: torch.device,
                         start: Mapping[str, Any], precision: str) -> torch.Tensor:
        x, mask, y = (t.to(device) for t in batch)
        with models.autocast(device, precision):
            logits = training.logits_of(model, x, mask, **start)
        return nn.functional.cross_entropy(logits.float(), y, reduction="none")

    def batch_loss(self, model: nn.Module, batch: Sequence[torch.Tensor], *, device: torch.device,
                   start: Mapping[str, Any], precision: str, criterion: nn.Module | None = None
                   ) -> tuple[torch.Tensor, int]:
        """Through ``criterion`` (the mean cross-entropy, or the one Opacus' ghost clipping returns,
        which needs the logits and labels themselves)."""
        x, mask, y = (t.to(device) for t in batch)
        with models.autocast(device, precision):
            logits = training.logits_of(model, x, mask, **start)
        crit = criterion if criterion is not None else nn.CrossEntropyLoss()
        return crit(logits.float(), y), int(y.shape[0])

    def evaluate(self, model: nn.Module, data: TensorDataset, *, device: torch.device, precision: str,
                 num_labels: int, cfg: ModelConfig | None = None) -> dict[str, float]:
        ev = training.evaluate(model, data, device=device, num_labels=num_labels, precision=precision)
        return {"accuracy": ev.accuracy, "loss": ev.loss, "macro-f1": ev.macro_f1, "examples": float(ev.examples)}

    def prefix_start(self, model_cfg: ModelConfig, adapter: AdapterConfig) -> int:
        return prefix.prefix_start(model_cfg, adapter)

    def ffn_start(self, model_cfg: ModelConfig, adapter: AdapterConfig) -> bool:
        return prefix.ffn_start(model_cfg, adapter)

    def compute_prefix(self, model: nn.Module, data: TensorDataset, *, start_layer: int, ffn_start: bool,
                       precision: str) -> TensorDataset:
        return prefix.compute_prefix(model, data, start_layer=start_layer, ffn_start=ffn_start, precision=precision)
