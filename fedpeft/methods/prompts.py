"""Prompt learning (peft): prompt tuning (Lester et al. 2021), P-tuning (Liu et al. 2021, MLP
encoder) and prefix tuning (Li & Liang 2021), with one virtual-token computation per example.

The hazard: for prompt tuning and P-tuning peft embeds the virtual tokens once, at batch size 1,
and repeats the result (peft#2043, a speed-up). Opacus' hooks then see one example whose gradient
is the batch's sum and would clip that sum as if it were one record's: a privacy bug, silent when
the prompt is the only trainable tensor. ``PerExamplePrompts`` computes the prompts for every
example instead (the same values), so each row's gradient is its own; ``check_grad_samples`` in the
training loop refuses any step whose per-example gradients are not one per example.

Virtual tokens enter at layer 0 (prefix tuning: at every layer's keys and values), so the
frozen-prefix cache cannot serve these methods: they run the full forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftConfig, PeftModel, PeftType, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from fedpeft.config import AdapterConfig


class PerExamplePrompts:
    """Mixin over a peft model class: ``get_prompt`` runs the prompt encoder on every example's
    virtual tokens rather than once (see the module docstring). Prefix tuning already does."""

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None,
                   max_cache_len: int | None = None) -> Any:
        model: Any = self
        cfg = model.active_peft_config
        if cfg.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING) and not cfg.inference_mode:
            encoder = model.prompt_encoder[model.active_adapter]
            tokens = model.prompt_tokens[model.active_adapter][: cfg.num_virtual_tokens]
            return encoder(tokens.unsqueeze(0).expand(batch_size, -1).to(encoder.embedding.weight.device))
        return super().get_prompt(batch_size, task_ids=task_ids, max_cache_len=max_cache_len)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def prepare_prompts(model: PeftModel) -> None:
    cls = type(model)
    if not issubclass(cls, PerExamplePrompts):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"PerExample{cls.__name__}", (PerExamplePrompts, cls), {})
        model.__class__ = _CLASSES[cls]  # same state; only get_prompt differs


def _prompt(cfg: AdapterConfig, task_type: str, targets: list[str] | None) -> PeftConfig:
    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens)


def _p_tuning(cfg: AdapterConfig, task_type: str, targets: list[str] | None) -> PeftConfig:
    # The MLP encoder (Opacus has Linear samplers); the LSTM one would need Opacus' DPLSTM.
    return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens,
                               encoder_reparameterization_type="MLP", encoder_hidden_size=cfg.rank * 8)


def _prefix(cfg: AdapterConfig, task_type: str, targets: list[str] | None) -> PeftConfig:
    # No reparameterisation MLP: the prefix keys and values are the trained tensor (one Embedding,
    # which Opacus samples per example: prefix tuning embeds every example's virtual tokens).
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens, prefix_projection=False)


from fedpeft.methods import register_adapter_method  # noqa: E402

for _name, _build in (("prompt", _prompt), ("p-tuning", _p_tuning)):
    register_adapter_method(_name, _build, prepare=prepare_prompts)
register_adapter_method(
    "prefix", _prefix, prepare=prepare_prompts,
)
