"""LoRA and DoRA (peft), with DoRA's per-example magnitude gradients for Opacus.

DoRA (Liu et al. 2024) writes the adapted weight as m * (W + s·BA) / ||W + s·BA||_row with the
row norm detached, as peft computes it. Opacus' own Linear sampler is exact for A and B; the
magnitude m lives in peft's ``DoraLinearLayer``, which Opacus cannot differentiate (its forward takes
keyword-only tensors), so it gets its sampler here. peft also runs B(A(I)) to form BA for that norm;
Opacus would take that call for a batch of d_in examples, so the subclass below forms it with no
gradient (the norm is detached anyway: the function is unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.dora import DoraLinearLayer
from peft.utils.other import transpose

from fedpeft.config import AdapterConfig
from fedpeft.methods.persample import per_example_dot


def _lora(cfg: AdapterConfig, task_type: str, targets: list[str] | None, *, dora: bool = False) -> PeftConfig:
    return LoraConfig(
        task_type=task_type,
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # peft types it int; it takes any float
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=cfg.layer_list,
        use_rslora=cfg.use_rslora,
        use_dora=dora,
    )


class DPDoraLinearLayer(DoraLinearLayer):
    """peft's DoRA magnitude, remembering the LoRA pair it was called with (for its grad sampler)."""

    def get_lora_weight(self, lora_A: Any, lora_B: Any, adapter_name: str | None = None) -> torch.Tensor:
        with torch.no_grad():  # only feeds the detached row norm (see the module docstring)
            return super().get_lora_weight(lora_A, lora_B, adapter_name=adapter_name)

    def forward(self, x: torch.Tensor, *, lora_A: Any, lora_B: Any, scaling: float, base_layer: Any,
                base_result: torch.Tensor | None = None, adapter_name: str = "default") -> torch.Tensor:
        self.__dict__["_fedpeft_call"] = (lora_A, lora_B, scaling, base_layer)  # not a submodule
        # W x, which peft already computed (base_result, bias included): the sampler reuses it
        bias = getattr(base_layer, "bias", None)
        self.__dict__["_fedpeft_wx"] = (None if base_result is None or not torch.is_grad_enabled() else
                                        (base_result - bias if bias is not None else base_result).detach())
        return super().forward(x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                               base_result=base_result, adapter_name=adapter_name)


@register_grad_sampler(DPDoraLinearLayer)
def dora_magnitude_grad_sample(layer: DPDoraLinearLayer, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """d out_j / d m_j = (W x + s·B A x)_j / ||W + s·BA||_j, summed over positions, per example."""
    lora_A, lora_B, scaling, base_layer = layer.__dict__["_fedpeft_call"]
    m = layer.weight
    with torch.no_grad():
        x = activations[0].to(m.dtype)
        w = transpose(base_layer.weight, layer.fan_in_fan_out).to(m.dtype)
        ba = lora_B.weight.to(m.dtype) @ lora_A.weight.to(m.dtype)
        norm = torch.linalg.norm(w + scaling * ba, dim=1)
        wx = layer.__dict__.get("_fedpeft_wx")
        if wx is None or tuple(wx.shape[:-1]) != tuple(x.shape[:-1]):
            wx = F.linear(x, w)
        direction = wx.to(m.dtype) + scaling * F.linear(F.linear(x, lora_A.weight.to(m.dtype)), lora_B.weight.to(m.dtype))
        gs = per_example_dot(backprops, direction, m.dtype) / norm
    return {m: gs}


def prepare_dora(model: PeftModel) -> None:
    for module in model.modules():
        if type(module) is DoraLinearLayer:
            module.__class__ = DPDoraLinearLayer  # same state, same function; see DPDoraLinearLayer


from fedpeft.methods import register_adapter_method  # noqa: E402

register_adapter_method("lora", _lora, layer_local=True)
register_adapter_method(
    "dora", lambda c, t, m: _lora(c, t, m, dora=True), layer_local=True, prepare=prepare_dora,
)
