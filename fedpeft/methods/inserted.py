"""Methods peft does not have, written here: a bottleneck adapter (Houlsby et al. 2019, in
Pfeiffer et al.'s 2021 placement) and LoReFT (Wu et al. 2024), inserted into the base model and
trained and saved through peft's ``modules_to_save``.

Why by hand: peft has neither; the ``adapters`` library replaces transformers' model classes
(and pins transformers' versions), and ``pyreft`` wraps the model in pyvene; both would bypass
the peft model every other part of fedpeft uses. Each is a few lines.

- ``bottleneck``: after the feed-forward output projection of each adapted layer, before its
  residual: y + up(GELU(down(y))), width ``lora-rank``, ``up`` zero at init (the identity). Its two
  Linear layers have Opacus' own samplers.
- ``loreft``: on each adapted layer's output (every position), h + Rᵀ(W h + b − R h) with R's
  ``lora-rank`` rows orthonormal; W = R and b = 0 at init (the identity). Its sampler is below. R's
  rows are re-orthonormalised (QR) after every step and whenever a merged state is loaded: that is
  post-processing of released values (no privacy cost), and it is the merge rule: FedAvg averages
  R, W and b element-wise, and the average is projected back onto orthonormal rows before use.

The saved adapter is peft's file layout (adapter_config.json + safetensors: a LoRA config with no
target modules and these modules to save); plain peft loads it onto a base into which
``insert_modules`` has put the modules (``fedpeft.export`` does this).
"""

from __future__ import annotations

import re

import torch
from opacus.grad_sample import register_grad_sampler
from peft import LoraConfig, PeftConfig
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from fedpeft.config import AdapterConfig
from fedpeft.methods.persample import per_example_sum

BOTTLENECK = "fedpeft_bottleneck"
REFT = "fedpeft_reft"
INSERTED = (BOTTLENECK, REFT)  # trained through modules_to_save, but adapter tensors, not the head
# The feed-forward output projection (BERT, Llama, GPT-2) and the layer itself, by qualified name
FFN_OUT = r".*\.(?:layer\.(?P<a>\d+)\.output\.dense|layers\.(?P<b>\d+)\.mlp\.down_proj|h\.(?P<c>\d+)\.mlp\.c_proj)"
LAYER = r".*\.(?:layer|layers|h)\.(?P<a>\d+)"


class Bottleneck(nn.Module):
    def __init__(self, width: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, size)
        self.up = nn.Linear(size, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(nn.functional.gelu(self.down(y)))


class LoReFT(nn.Module):
    """h + Rᵀ(W h + b − R h): an edit of h inside the span of R's orthonormal rows."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(width, rank))
        self.R = nn.Parameter(q.T.contiguous())
        self.W = nn.Parameter(q.T.contiguous())
        self.b = nn.Parameter(torch.zeros(rank))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.R.to(h.dtype)
        delta = h @ self.W.to(h.dtype).T + self.b.to(h.dtype) - h @ r.T
        return h + delta @ r

    @torch.no_grad()
    def fedpeft_after_step(self) -> None:
        """Project R back onto orthonormal rows (QR, signs kept so an orthonormal R is unchanged).
        peft's frozen original copy (ModulesToSaveWrapper.original_module) is left alone."""
        if not self.R.requires_grad:
            return
        q, rr = torch.linalg.qr(self.R.T)
        self.R.copy_((q * torch.sign(torch.diagonal(rr)).unsqueeze(0)).T)


@register_grad_sampler(LoReFT)
def loreft_grad_sample(layer: LoReFT, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """With delta = W h + b − R h and g the output's gradient, per example (summed over positions):
    dW = (R g) hᵀ, db = R g, dR = delta gᵀ − (R g) hᵀ."""
    dt = layer.R.dtype
    with torch.no_grad():
        h, g = activations[0].to(dt), backprops.to(dt)
        rg = g @ layer.R.T
        delta = h @ layer.W.T + layer.b - h @ layer.R.T
        dw = torch.einsum("n...r,n...d->nrd", rg, h)
        return {layer.W: dw, layer.b: per_example_sum(rg),
                layer.R: torch.einsum("n...r,n...d->nrd", delta, g) - dw}


def _add_after(module: nn.Module, inputs: tuple, output: object) -> object:
    """Forward hook: the inserted module applied to the module's output (the hidden state of a tuple)."""
    child = getattr(module, BOTTLENECK) if hasattr(module, BOTTLENECK) else getattr(module, REFT)
    if isinstance(output, tuple):
        return (child(output[0]), *output[1:])
    return child(output)


def _width(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    if w is not None:  # a projection: its output width (GPT-2's Conv1D stores (in, out))
        return int(w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0])
    return int(next(m for m in module.modules() if isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__)
               .weight.shape[0])


def insert_modules(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Put the method's modules into the base model (seeded: every site and the server build the same
    ones) at the lora-layers (all when empty); return their names for peft's modules_to_save."""
    if cfg.method not in ("bottleneck", "loreft"):
        return []
    name, pattern, make = ((BOTTLENECK, FFN_OUT, Bottleneck) if cfg.method == "bottleneck" else (REFT, LAYER, LoReFT))
    layers = cfg.layer_list
    hits = []
    for qual, module in model.named_modules():
        m = re.fullmatch(pattern, qual)
        if m is None or hasattr(module, name):
            continue
        idx = int(next(v for v in m.groupdict().values() if v is not None))
        if layers is None or idx in layers:
            hits.append((idx, module))
    if not hits:
        raise ValueError(f"adapter={cfg.method!r} lora-layers={cfg.layers!r}: no layer of this model matches")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0x5EED)
        for _, module in sorted(hits, key=lambda t: t[0]):
            module.add_module(name, make(_width(module), cfg.rank))
            module.register_forward_hook(_add_after)
    return [name]


def after_step(model: nn.Module) -> None:
    """Post-processing a method asks for after each optimizer step or state load (LoReFT's projection)."""
    for m in model.modules():
        fn = getattr(m, "fedpeft_after_step", None)
        if fn is not None:
            fn()


def _build(cfg: AdapterConfig, task_type: str, targets: list[str] | None) -> PeftConfig:
    name = BOTTLENECK if cfg.method == "bottleneck" else REFT
    return LoraConfig(task_type=task_type, target_modules=DUMMY_TARGET_MODULES, modules_to_save=[name])


from fedpeft.methods import register_adapter_method  # noqa: E402

register_adapter_method("bottleneck", _build, layer_local=True, insert=insert_modules)
register_adapter_method("loreft", _build, layer_local=True, insert=insert_modules)
