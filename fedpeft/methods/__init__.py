"""The PEFT menu: one registry entry per method, each with its own Opacus grad sampler.

An entry says how to build the peft config, whether its per-example gradients are exact under
Opacus (and why not, when they are not), whether it touches only the layers it names (so the
frozen-prefix cache can serve it), and a ``prepare`` step that makes a freshly built peft model ready
for per-example gradients. Which merges and tasks a method takes is checked with the rest of the
run config (``RunConfig.__post_init__``), so a bad combination fails before any model loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftConfig, PeftModel

from fedpeft.config import METHOD_NAMES, AdapterConfig
from fedpeft.registry import Registry

Build = Callable[[AdapterConfig, str, "list[str] | None"], PeftConfig]  # (config, peft task type, targets)


class DPUnsupportedError(ValueError):
    """DP was asked for with a PEFT method Opacus cannot train correctly."""


class GradSampleError(RuntimeError):
    """A trainable tensor's per-example gradients are missing or not one per example: clipping them
    would bound the wrong thing, so the step is refused."""


def _no_prepare(model: PeftModel) -> None:
    return None


def _no_insert(model: torch.nn.Module, cfg: AdapterConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    build: Build
    dp_capable: bool = True
    dp_reason: str = ""
    layer_local: bool = False  # touches only the layers lora-layers names: the prefix cache can serve it
    prepare: Callable[[PeftModel], None] = field(default=_no_prepare)
    # modules a hand-written method puts into the base model before peft wraps it (fedpeft.methods.inserted)
    insert: Callable[[torch.nn.Module, AdapterConfig], list[str]] = field(default=_no_insert)


METHODS: Registry[AdapterMethod] = Registry("PEFT method", "adapter")


def register_adapter_method(name: str, build: Build, **kwargs: object) -> AdapterMethod:
    """Add a PEFT method (see ``AdapterMethod`` for the keywords)."""
    return METHODS.add(name, AdapterMethod(name, build, **kwargs))


adapter_method = METHODS.get


def require_dp_capable(name: str) -> None:
    """Raise ``DPUnsupportedError`` (with the reason) for a method Opacus cannot train correctly."""
    method = adapter_method(name)
    if not method.dp_capable:
        raise DPUnsupportedError(
            f"adapter={name!r} with dp=true: {method.dp_reason}. "
            "Use adapter='lora', or set dp=false for a non-private baseline."
        )


def check_grad_samples(params: list[torch.nn.Parameter], n: int) -> None:
    """Every trainable tensor carries exactly ``n`` per-example gradients (the prompt-tuning hazard:
    a prompt embedded once and repeated gives one summed row, which Opacus would clip as one example)."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise GradSampleError(f"a trainable tensor of shape {tuple(p.shape)} has no per-example gradient")
        rows = sum(g.shape[0] for g in gs) if isinstance(gs, list) else gs.shape[0]
        if rows != n or (not isinstance(gs, list) and tuple(gs.shape[1:]) != tuple(p.shape)):
            raise GradSampleError(f"a trainable tensor of shape {tuple(p.shape)} has per-example gradients of "
                                  f"shape {tuple(gs.shape) if not isinstance(gs, list) else 'list'} for a batch "
                                  f"of {n}")


# The entries register themselves on import.
from fedpeft.methods import inserted, lora, prompts, vectors  # noqa: E402,F401

assert set(METHODS.names()) == set(METHOD_NAMES), "fedpeft.config.METHOD_NAMES and the registry disagree"

after_step = inserted.after_step

__all__ = ["METHODS", "after_step", "AdapterMethod", "DPUnsupportedError", "GradSampleError", "adapter_method", "check_grad_samples",
           "register_adapter_method", "require_dp_capable"]
