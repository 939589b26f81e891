"""Vector methods: IA3 (learned rescaling, Liu et al. 2022) and BitFit (biases, Ben Zaken et al.
2022, as peft's additive BEFT bias), with exact per-example gradients for Opacus.

peft keeps each vector in a ``ParameterDict`` that is never called, so no Opacus hook ever sees it
("Per sample gradient is not initialized"). Opacus hooks a module only when it holds a trainable
tensor itself, so each IA3/BEFT layer gets a one-element handle parameter (``HANDLE``: no effect on
the output, zero gradient, never sent) and the samplers below compute the vector's gradients from
the layer's input and output gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from peft import BeftConfig, IA3Config, PeftConfig, PeftModel
from peft.tuners.beft.layer import Linear as BeftLinear
from peft.tuners.ia3.layer import Linear as IA3Linear
from peft.utils.other import transpose

from fedpeft.config import AdapterConfig
from fedpeft.methods.persample import per_example_dot, per_example_sum

HANDLE = "fedpeft_dp_handle"
# peft's per-architecture IA3 choice (keys, values, the feed-forward output), BERT and Llama/GPT-2 names
IA3_TARGETS = {"SEQ_CLS": ["key", "value", "output.dense"], "CAUSAL_LM": ["k_proj", "v_proj", "down_proj", "c_attn",
                                                                           "mlp.c_proj"]}
IA3_FEEDFORWARD = {"SEQ_CLS": ["output.dense"], "CAUSAL_LM": ["down_proj", "mlp.c_proj"]}
LINEAR = {"SEQ_CLS": ["query", "key", "value", "dense"],  # every Linear of a BERT layer, of a Llama layer
          "CAUSAL_LM": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def in_layers(names: list[str], layers: list[int]) -> str:
    """A peft target regex: modules ending in one of ``names`` inside the given layers only (IA3 and
    BEFT have no layers_to_transform), so the frozen layers below stay cacheable."""
    ends = "|".join(n.replace(".", r"\.") for n in names)
    return rf".*\.(?:layer|layers|h)\.(?:{'|'.join(map(str, layers))})\.(?:.*\.)?(?:{ends})"


def _ia3(cfg: AdapterConfig, task_type: str, targets: list[str] | None) -> PeftConfig:
    layers = cfg.layer_list
    if not layers:  # every layer: peft's own mapping for the architecture
        return IA3Config(task_type=task_type)
    return IA3Config(task_type=task_type, target_modules=in_layers(IA3_TARGETS[task_type], layers),
                     feedforward_modules=in_layers(IA3_FEEDFORWARD[task_type], layers))


def _bitfit(cfg: AdapterConfig, task_type: str, targets: list[str] | None) -> PeftConfig:
    # BitFit trains the biases: peft's BEFT adds a zero-initialised bias to each targeted Linear
    # (the same function class, and a loadable PEFT format), on every Linear of the lora-layers.
    layers = cfg.layer_list
    if not layers:
        return BeftConfig(task_type=task_type, target_modules=LINEAR["SEQ_CLS"] if task_type == "SEQ_CLS"
                          else "all-linear")
    return BeftConfig(task_type=task_type, target_modules=in_layers(LINEAR[task_type], layers))


def _vector(layer: torch.nn.Module) -> torch.nn.Parameter:
    store = layer.ia3_l if isinstance(layer, IA3Linear) else layer.beft_bias
    (name,) = [a for a in layer.active_adapters if a in store]
    return store[name]


def _handle_gs(layer: torch.nn.Module, n: int) -> dict[torch.nn.Parameter, torch.Tensor]:
    h = getattr(layer, HANDLE)
    return {h: torch.zeros((n, *h.shape), dtype=h.dtype, device=h.device)}


@register_grad_sampler(IA3Linear)
def ia3_grad_sample(layer: IA3Linear, activations: list[torch.Tensor],
                    backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """out = base(x) * l, or for a feed-forward layer out = base(x * l)."""
    v = _vector(layer)
    base = layer.get_base_layer()
    with torch.no_grad():
        x, g = activations[0], backprops  # cast inside per_example_dot's product, not copied first
        if layer.is_feedforward:  # d out / d l_i = x_i (g W)_i
            gw = base.__dict__.pop("_fedpeft_grad_in", None)
            if gw is not None and tuple(gw.shape) == tuple(x.shape):
                # autograd's own g W for the base's input; Opacus scales backprops by the batch length
                # under loss_reduction="mean" (the only reduction train_local uses), so the sum is too
                gs = per_example_dot(gw, x, v.dtype) * layer.max_batch_len
            else:  # g W in the backprop's own dtype (bfloat16 under autocast), as Opacus' Linear sampler
                gw = backprops @ transpose(base.weight, layer.fan_in_fan_out).to(backprops.dtype)
                gs = per_example_dot(gw, x, v.dtype)
        else:  # d out / d l_o = base(x)_o (the base's output from the forward, when it is this batch's)
            out = base.__dict__.get("_fedpeft_out")
            if out is None or tuple(out.shape[:-1]) != tuple(x.shape[:-1]):
                w = transpose(base.weight, layer.fan_in_fan_out).to(v.dtype)  # (out, in); GPT-2's Conv1D: (in, out)
                out = F.linear(x.to(v.dtype), w, base.bias.to(v.dtype) if base.bias is not None else None)
            gs = per_example_dot(g, out, v.dtype)
    return {v: gs.reshape(len(gs), *v.shape), **_handle_gs(layer, len(gs))}


@register_grad_sampler(BeftLinear)
def beft_grad_sample(layer: BeftLinear, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """out = base(x) + b: d out / d b = 1, summed over positions."""
    v = _vector(layer)
    with torch.no_grad():
        gs = per_example_sum(backprops.to(v.dtype))
    return {v: gs.reshape(len(gs), *v.shape), **_handle_gs(layer, len(gs))}


def _drop_handle(module: torch.nn.Module, state: dict, prefix: str, local_metadata: object) -> None:
    state.pop(prefix + HANDLE, None)  # never saved, never sent: it carries nothing


def _keep_output(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook on an IA3 layer's frozen base: its output, kept for the sampler (training only)."""
    module.__dict__["_fedpeft_out"] = output.detach() if torch.is_grad_enabled() and module.training else None


def _keep_grad_in(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook on a feed-forward IA3 layer's frozen base: autograd's gradient for its input
    (x * l), kept for the sampler, so it need not compute g W again (a matmul as large as the layer)."""
    module.__dict__["_fedpeft_grad_in"] = None
    if torch.is_grad_enabled() and module.training and args and args[0].requires_grad:
        args[0].register_hook(lambda g: module.__dict__.__setitem__("_fedpeft_grad_in", g.detach()))


def prepare_vectors(model: PeftModel) -> None:
    for module in model.modules():
        if isinstance(module, IA3Linear) and not hasattr(module, HANDLE):
            base = module.get_base_layer()
            if module.is_feedforward:
                base.register_forward_pre_hook(_keep_grad_in)
            else:
                base.register_forward_hook(_keep_output)
        if isinstance(module, (IA3Linear, BeftLinear)) and not hasattr(module, HANDLE):
            v = _vector(module)
            module.register_parameter(HANDLE, torch.nn.Parameter(torch.zeros(1, dtype=v.dtype, device=v.device)))
            module.register_state_dict_post_hook(_drop_handle)


from fedpeft.methods import register_adapter_method  # noqa: E402

register_adapter_method("ia3", _ia3, prepare=prepare_vectors, layer_local=True)
register_adapter_method("bitfit", _bitfit, prepare=prepare_vectors, layer_local=True)
