"""Load a fedpeft adapter folder for inference: the right base model, then plain peft."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import PeftModel

from fedpeft.adapters import read_metadata
from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.models import load_base_model


def with_inserted_modules(base: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """A hand-written method's modules (bottleneck, LoReFT: ``fedpeft.methods.inserted``) put into the
    base, where the saved adapter expects them; the method's registry entry says (peft's own methods
    insert nothing)."""
    from fedpeft.methods import adapter_method

    meta = read_metadata(path)
    method = str(meta.get("adapter", "lora"))
    adapter_method(method).insert(base, AdapterConfig(method=method, rank=int(meta.get("lora-rank", 8)),
                                                      layers=str(meta.get("lora-layers", ""))))
    return base


def load_classifier(path: str | Path) -> PeftModel:
    """Base model as ``fedpeft.json`` describes it (name, layers, pooling, labels) + the adapter."""
    meta = read_metadata(path)
    if "labels" not in meta:
        raise ValueError(f"{path}: no fedpeft.json with 'labels'; build the base yourself and call "
                         "PeftModel.from_pretrained(base, path)")
    if meta.get("task", "classification") != "classification":
        raise ValueError(f"{path}: a task={meta['task']!r} adapter; load it with fedpeft.export.load_causal_lm")
    labels = [str(x) for x in meta["labels"]]
    cfg = ModelConfig(name=str(meta.get("model", "minilm")), layers=int(meta.get("model-layers", 0)),
                      pooling=str(meta.get("pooling", "mean")), head_init="random")  # the adapter holds the head
    base = with_inserted_modules(load_base_model(cfg, num_labels=len(labels), labels=labels), path)
    return PeftModel.from_pretrained(base, str(path)).eval()


def causal_lm_config(path: str | Path) -> ModelConfig:
    """The base model's config a causal-lm adapter's ``fedpeft.json`` names."""
    meta = read_metadata(path)
    if meta.get("task") != "causal-lm":
        raise ValueError(f"{path}: not a causal-lm adapter (fedpeft.json task={meta.get('task')!r}); "
                         "use fedpeft.export.load_classifier")
    return ModelConfig(task="causal-lm", name=str(meta["model"]), layers=int(meta.get("model-layers", 0)),
                       seed=int(meta.get("model-seed", 0)))


def load_causal_lm(path: str | Path) -> PeftModel:
    """The causal LM ``fedpeft.json`` names (the embedded SmolLM2 from its materialised folder) + the adapter."""
    from fedpeft.llm import load_causal_lm as base_lm

    return PeftModel.from_pretrained(with_inserted_modules(base_lm(causal_lm_config(path)), path), str(path)).eval()


def generate(path: str | Path, prompts: list[str], *, max_new_tokens: int = 64, device: torch.device | None = None,
             precision: str = "auto") -> list[str]:
    """Greedy answers of the adapted model to plain-text prompts (each sent as one user turn of the
    tokenizer's chat template, as the training prompts were)."""
    from fedpeft import models
    from fedpeft.data.instructions import chat
    from fedpeft.tasks import TASKS
    from fedpeft.tasks.causal_lm import CausalLM, render_prompt

    cfg = causal_lm_config(path)
    task = TASKS.get("causal-lm")
    assert isinstance(task, CausalLM)
    device = device or models.select_device()
    with warnings.catch_warnings():  # nothing is merged here, so peft's caveat about merging a LoRA on a tied
        # lm_head (the answer head's place, untied by design: docs/methods.md) does not apply
        warnings.filterwarnings("ignore", message=".*tied layer is part of the adapter.*", category=UserWarning)
        model = load_causal_lm(path).to(device)
    tok = task.tokenizer(cfg)
    ids = [torch.tensor(tok(render_prompt(tok, chat(p)), add_special_tokens=False)["input_ids"]) for p in prompts]
    return task.generate(model, ids, cfg, device=device, precision=precision, max_new_tokens=max_new_tokens)
