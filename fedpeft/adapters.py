"""Adapters through peft: build, read/write exactly the trainable tensors, PEFT-format I/O.

The methods live in ``fedpeft.methods`` (one registry entry each, with its grad sampler);
``create_adapter`` builds one and prepares it for per-example gradients.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import PreTrainedModel

from fedpeft.config import AdapterConfig
from fedpeft.io import atomic_dir
from fedpeft.methods import (  # re-exported: the registry lives in fedpeft.methods
    METHODS,
    AdapterMethod,
    DPUnsupportedError,
    adapter_method,
    after_step,
    answer_head,
    register_adapter_method,
    require_dp_capable,
)
from fedpeft.methods.vectors import HANDLE

log = logging.getLogger(__name__)

AdapterState = dict[str, torch.Tensor]
METADATA_FILE = "fedpeft.json"


__all__ = ["METHODS", "AdapterMethod", "AdapterStateError", "DPUnsupportedError", "adapter_method", "create_adapter",
           "get_adapter_state", "register_adapter_method", "require_dp_capable", "save_adapter", "set_adapter_state"]


class AdapterStateError(ValueError):
    """Adapter tensors do not match the model's adapter (keys, shapes or dtype)."""


def create_adapter(model: PreTrainedModel, cfg: AdapterConfig, *, dp: bool, base_name: str,
                   task_type: str = "SEQ_CLS", targets: list[str] | None | str = "config") -> PeftModel:
    """Wrap ``model`` with the configured adapter (peft ``task_type``; a sequence classifier's head
    is trained too, as modules_to_save). ``targets``: the modules LoRA adapts (None: peft's default
    for the architecture; "config": the config's lora-target-modules).

    Raises ``DPUnsupportedError`` before touching the model when ``dp`` is asked for a method that
    Opacus cannot train correctly.
    """
    method = adapter_method(cfg.method)
    if dp:
        require_dp_capable(cfg.method)
    method.insert(model, cfg)
    peft_config = method.build(cfg, task_type, cfg.target_module_list if isinstance(targets, str) else targets)
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:  # peft's NoMatchingPeftModuleError: say which of our keys to change
        raise ValueError(f"lora-target-modules={cfg.target_modules!r} lora-layers={cfg.layers!r}: "
                         f"no module of this model matches ({e})") from e
    peft_model.peft_config["default"].base_model_name_or_path = base_name  # peft overwrites it from the model
    method.prepare(peft_model)
    return peft_model


def is_prompt_learning(model: PeftModel) -> bool:
    return bool(model.active_peft_config.is_prompt_learning)


def _exchanged(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """A prompt-learning adapter's trainable tensors by name (adapter name stripped). peft's own state
    holds P-tuning's encoder *output*, which cannot be trained further, so sites exchange the encoder."""
    return {n.replace(".default.", "."): p for n, p in model.named_parameters() if p.requires_grad and HANDLE not in n}


def _peft_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """peft's adapter state less the answer head's fixed, public selector (``fedpeft.methods.answer_head``)."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    for k in answer_head.fixed_keys(model, list(state)):
        del state[k]
    return state


def get_adapter_state(model: PeftModel) -> AdapterState:
    """Exactly the adapter's trainable tensors (peft names, adapter name stripped), detached copies."""
    if is_prompt_learning(model):
        return {k: v.detach().cpu().clone() for k, v in _exchanged(model).items()}
    state = _peft_state(model)
    # adapter tensors: the trainable ones, plus a LoRA A frozen on purpose (merge='frozen_a')
    trainable = {n for n, p in model.named_parameters()
                 if (p.requires_grad or ".lora_A." in n) and HANDLE not in n}
    if len(state) != len(trainable):
        raise AdapterStateError(
            f"adapter state has {len(state)} tensors but the model has {len(trainable)} trainable ones"
        )
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def check_adapter_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> None:
    """Raise with the offending key when ``got`` is not exactly shaped like ``expected``."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        raise AdapterStateError(f"missing adapter keys ({len(missing)}): {missing[:5]}")
    base = [k for k in unexpected if "lora_" not in k]
    if base:  # the frozen base never leaves a site, and no site may rewrite it
        raise AdapterStateError(f"key {base[0]!r} names a frozen base weight, not an adapter tensor "
                                f"({len(unexpected)} unexpected keys)")
    if unexpected:
        raise AdapterStateError(f"unexpected adapter keys ({len(unexpected)}): {unexpected[:5]}")
    for k, ref in expected.items():
        t = got[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise AdapterStateError(f"{k}: shape {tuple(t.shape)} != expected {tuple(ref.shape)}")
        if not torch.is_floating_point(t):
            raise AdapterStateError(f"{k}: dtype {t.dtype} is not floating point")
        if torch.is_floating_point(ref) and t.dtype != ref.dtype:
            raise AdapterStateError(f"{k}: dtype {t.dtype} != expected {ref.dtype}")
        if not torch.isfinite(t).all():
            raise AdapterStateError(f"{k}: contains NaN or Inf")


def set_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors, rejecting missing/unexpected keys and shape mismatches."""
    if is_prompt_learning(model):
        params = _exchanged(model)
        check_adapter_state({k: p.detach() for k, p in params.items()}, state)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(device=p.device, dtype=p.dtype))
        return
    current = _peft_state(model)
    check_adapter_state(current, state)
    ref = next(iter(current.values()))
    result = set_peft_model_state_dict(
        model, {k: v.to(device=ref.device, dtype=current[k].dtype) for k, v in state.items()}
    )
    after_step(model)  # a method's post-processing of loaded values (LoReFT: R's rows orthonormal)
    bad = [k for k in getattr(result, "unexpected_keys", []) if any(t in k for t in ("lora_", "beft_", "ia3_"))]
    if bad:
        raise AdapterStateError(f"peft did not place adapter keys: {bad[:5]}")


def freeze_lora_a(model: PeftModel, frozen: bool) -> None:
    """``merge='frozen_a'`` (FFA-LoRA): A stays the shared random matrix; only B (and the head) train."""
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(not frozen)


@torch.no_grad()
def fold_into_base(model: PeftModel, updates: Mapping[str, torch.Tensor]) -> None:
    """Set each LoRA module's frozen base weight to its original plus ``updates[module]`` (a dense
    d_out × d_in update; module names as in the adapter state, without ``.lora_A.weight``); modules
    not named go back to their original weight. ``merge='stack'`` folds the global update this way."""
    originals: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedpeft_base_weights", {})
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        key = name.replace(".default", "")
        if key not in updates and key not in originals:
            continue
        orig = originals.setdefault(key, base.weight.detach().clone())
        upd = updates.get(key)
        base.weight.copy_(orig if upd is None else orig + upd.to(orig.dtype).to(orig.device))


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model: PeftModel, path: str | Path, *, metadata: Mapping[str, object] | None = None,
                 card: str | None = None) -> Path:
    """Save in the Hugging Face PEFT format (adapter_config.json + adapter_model.safetensors).

    Written into a temp folder then renamed, so a crash never leaves a half-written adapter.
    ``metadata`` (labels, model name) goes to ``fedpeft.json`` beside the PEFT files.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        answer_head.save_statistics(model, tmp)  # public numbers: an auditor reads A back to V without the model
        with answer_head.plain_peft(model):
            # the base's embeddings are never part of an adapter (peft would add them when lm_head is a target)
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        # peft's placeholder card names this machine's install path as base_model: never ship it
        (tmp / "README.md").write_text(card or "A fedpeft checkpoint (PEFT format); the run's card is in "
                                               "its adapter/README.md.\n")
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, sort_keys=True))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    p = Path(path) / METADATA_FILE
    return json.loads(p.read_text()) if p.exists() else {}
