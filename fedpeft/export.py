"""Load a fedpeft adapter folder for inference: the right base model, then plain peft."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from fedpeft.adapters import read_metadata
from fedpeft.config import ModelConfig
from fedpeft.models import load_base_model


def load_classifier(path: str | Path) -> PeftModel:
    """Base model as ``fedpeft.json`` describes it (name, layers, pooling, labels) + the adapter."""
    meta = read_metadata(path)
    if "labels" not in meta:
        raise ValueError(f"{path}: no fedpeft.json with 'labels'; build the base yourself and call "
                         "PeftModel.from_pretrained(base, path)")
    labels = [str(x) for x in meta["labels"]]
    cfg = ModelConfig(name=str(meta.get("model", "minilm")), layers=int(meta.get("model-layers", 0)),
                      pooling=str(meta.get("pooling", "mean")), head_init="random")  # the adapter holds the head
    base = load_base_model(cfg, num_labels=len(labels), labels=labels)
    return PeftModel.from_pretrained(base, str(path)).eval()
