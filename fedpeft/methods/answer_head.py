"""The whitened answer head: a LoRA on a causal LM's ``lm_head`` that reads the answer choices out
of the final hidden state, trained in whitened coordinates and exported as plain PEFT.

Why: a decoder's final state is badly conditioned for a read-out. SmolLM2's has one coordinate
(a "massive activation") at 44 ± 1.5 on every prompt, in a state of norm ~56, so a gradient step
on the LM head's rows moves mostly along that constant direction; under DP, with every example's
gradient clipped to one norm, little is left for the directions that tell the answers apart. The
frozen model's final state separates the referral specialties linearly at 0.66, yet 24 DP steps of
LoRA read out 0.22 (docs/benchmarks.md, 2026-12-07).

The head adds ``V · z(h)`` to the logits of the choices' first tokens, where ``z`` centres and
scales ``h`` by *public* statistics (a calibration set no site holds: every party computes the same
ones, and they reveal nothing about a site) and keeps the massive coordinate, divided by its mean,
as the bias feature. ``V`` (choices × width) is the only trainable tensor; it starts at zero, so the
round-0 model is the base model.

In peft's terms it is a LoRA on ``lm_head`` of rank = the number of choices: ``lora_A = V`` reading
``z`` (the whitening stands in peft's ``lora_dropout`` slot, so Opacus' own ``Linear`` sampler
sees the features it differentiates), ``lora_B`` a fixed 0/1 selector of the choices' token rows
(frozen and public: never exchanged), scaling 1. ``z`` is linear in ``h`` (``z = M h``), so the
saved adapter holds ``A = V M`` in the plain slot, and ``PeftModel.from_pretrained`` gives the same
logits with no fedpeft code (``plain_peft``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

log = logging.getLogger(__name__)

PUBLIC_SEED = 777_777  # the referral generator's calibration seed: sites draw theirs through hash_seed
HEAD = "lm_head"
CALIBRATION_PROMPTS = 128  # public prompts behind the statistics (the width is 576 for SmolLM2: a mean and a scale each)


class AnswerHeadError(ValueError):
    """The answer head cannot be built as configured; the message names the key and the value."""


class Whiten(nn.Module):
    """z = M h: each coordinate centred on the public mean (scaled by the massive coordinate's
    ratio to its own mean, so a prompt whose state is larger is centred proportionally) and divided
    by the public standard deviation; coordinate ``j`` (the massive one) becomes h_j / mu_j, a
    bias feature near 1."""

    def __init__(self, mu: torch.Tensor, sd: torch.Tensor) -> None:
        super().__init__()
        mu, sd = mu.double(), sd.double()
        self.j = steadiest(mu, sd)[0]
        onehot = torch.zeros_like(mu)
        onehot[self.j] = 1.0
        scale = (1.0 - onehot) / sd
        mix = onehot - (1.0 - onehot) * mu / sd  # z = h * scale + mix * c, c = h_j / mu_j
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("mix", mix.float(), persistent=False)
        self.register_buffer("bias_scale", (1.0 / mu[self.j]).float(), persistent=False)
        self.register_buffer("matrix", (torch.diag(scale) + torch.outer(mix, onehot) / mu[self.j]).float(),
                             persistent=False)  # z = M h; buffers of public numbers, never saved
        self.statistics = (mu.float(), sd.float())  # what M is built from (saved beside checkpoints)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        hf = h.float()  # the centring subtracts two ~44s: never in bfloat16
        return hf * self.scale + self.mix * (hf[..., self.j:self.j + 1] * self.bias_scale)


STEADY_RATIO = 10.0  # below it the bias feature h_j / mu_j varies by over 10 % from prompt to prompt


def steadiest(mu: torch.Tensor, sd: torch.Tensor) -> tuple[int, float]:
    """The coordinate that carries the head's bias (the largest |mean| / sd) and that ratio: a plain
    LoRA on ``lm_head`` has no bias of its own, so the head needs a near-constant coordinate."""
    ratio = mu.abs().double() / sd.double()
    j = int(ratio.argmax())
    return j, float(ratio[j])


def calibration_prompts(source: str, n: int) -> list[str]:
    """Public prompts: the referral generator with a seed no site uses, or a file's prompts (any
    layout ``fedpeft.data.instructions`` reads)."""
    if source == "referrals":
        from fedpeft.data.instructions import generate_referrals

        return generate_referrals(n=n, seed=PUBLIC_SEED)[0]
    from fedpeft.data.instructions import load_instructions

    if not Path(source).is_file():
        raise AnswerHeadError(f"answer-head-calibration={source!r}: not 'referrals' and not a file")
    return load_instructions(source)[0][:n]


def choice_tokens(tok: object, choices: Sequence[str]) -> list[int]:
    """Each choice's first token, as it starts a response (distinct, or the head cannot tell them apart)."""
    ids = [int(tok(c, add_special_tokens=False)["input_ids"][0]) for c in choices]
    if len(set(ids)) != len(ids):
        same = [c for c, i in zip(choices, ids) if ids.count(i) > 1]
        raise AnswerHeadError(f"answer-choices={','.join(choices)!r}: {same} start with the same token")
    return ids


@torch.no_grad()
def answer_states(model: nn.Module, tok: object, prompts: Sequence[str], *, precision: str | None = None,
                  batch_size: int = 32) -> torch.Tensor:
    """The final state where the answer starts (what the LM head reads), one row per prompt,
    float32 on the CPU: in float32 without ``precision`` (autocast off), else in the run's."""
    from fedpeft import models
    from fedpeft.tasks.causal_lm import body_of, render_prompt

    _, body = body_of(model)
    device = next(model.parameters()).device
    texts = [render_prompt(tok, p) for p in prompts]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])  # similar lengths pad least
    states = torch.zeros((len(texts), int(model.config.hidden_size)))
    cast = torch.autocast(device.type, enabled=False) if precision is None else models.autocast(device, precision)
    with cast:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True,
                      padding_side="left", add_special_tokens=False)
            out = body(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
            states[idx] = out.last_hidden_state[:, -1].float().cpu()
    return states


def public_statistics(model: nn.Module, tok: object, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (float32) of the frozen model's final state where the answer
    starts, over public prompts. Float32 on any CPU: every party must get the same numbers."""
    states = answer_states(model, tok, prompts)
    return states.mean(0), states.std(0) + 1e-3


_STATISTICS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def statistics_for(base: nn.Module, model_key: tuple, tokenizer_name: str, source: str, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The public statistics for the frozen ``base`` (``model_key``: what its weights depend on):
    computed once per machine and kept under
    fedpeft's cache folder (a simulation's processes, and later runs, read them: the same numbers
    for all, and ~15 s of SmolLM2 forwards not repeated in every worker)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from fedpeft import llm
    from fedpeft.io import atomic_dir

    what = repr((model_key, source, n, torch.__version__)).encode()
    if Path(source).is_file():
        what += hashlib.sha256(Path(source).read_bytes()).digest()
    key = hashlib.sha256(what).hexdigest()[:24]
    if key in _STATISTICS:
        return _STATISTICS[key]
    folder = llm.cache_home() / "answer-head" / key
    try:
        saved = load_file(str(folder / "statistics.safetensors"))
        stats = saved["mean"], saved["std"]
    except (OSError, KeyError, RuntimeError):  # not there yet (or unreadable): compute, then keep
        stats = public_statistics(base, llm.load_tokenizer(tokenizer_name), calibration_prompts(source, n))
        try:
            with atomic_dir(folder) as tmp:
                save_file({"mean": stats[0].contiguous(), "std": stats[1].contiguous()},
                          str(tmp / "statistics.safetensors"))
        except OSError:  # another process of the run kept them first: theirs are the same numbers
            pass
    j, ratio = steadiest(*stats)
    if ratio < STEADY_RATIO:  # once per process and model: _STATISTICS keeps them
        log.warning("answer-head on %s: no steady coordinate to carry the head's bias (the steadiest, %d, has "
                    "|mean|/sd = %.1f over %d public prompts; below %.0f, so the bias varies by ~%.0f %% from "
                    "prompt to prompt). The head still trains, less well; answer-head=false leaves it out.",
                    tokenizer_name, j, ratio, n, STEADY_RATIO, 100 / ratio)
    _STATISTICS[key] = stats
    return stats


def attach(model: PeftModel, token_ids: Sequence[int], mu: torch.Tensor, sd: torch.Tensor) -> LoraLinear:
    """Put the head on ``model``'s ``lm_head`` (in place) and make its peft config name it, so the
    saved adapter reloads with plain peft."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    k = len(token_ids)
    config = LoraConfig(r=k, lora_alpha=k, lora_dropout=0.0, target_modules=[HEAD])
    layer = LoraLinear(head, "default", config=config, r=k, lora_alpha=k)
    weight = layer.lora_A["default"].weight
    dev = weight.device
    with torch.no_grad():
        weight.zero_()
        select = torch.zeros_like(layer.lora_B["default"].weight)
        select[torch.tensor(list(token_ids)), torch.arange(k)] = 1.0
        layer.lora_B["default"].weight.copy_(select)
    layer.lora_B["default"].weight.requires_grad_(False)  # the selector is fixed and public
    layer.lora_dropout["default"] = Whiten(mu, sd).to(dev)
    base.set_output_embeddings(layer)
    _name_in_config(model, k)
    return layer


def _name_in_config(model: PeftModel, k: int) -> None:
    """The saved config's targets: exactly the modules that hold a LoRA, ``lm_head`` included (peft's
    ``layers_to_transform`` would skip it: it has no layer index)."""
    cfg = model.peft_config["default"]
    names = sorted(n[len("base_model.model."):] for n, m in model.named_modules()
                   if isinstance(m, LoraLinear) and n.startswith("base_model.model."))
    cfg.target_modules = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    cfg.layers_to_transform = None
    cfg.rank_pattern = {**(cfg.rank_pattern or {}), f"^{HEAD}$": k}
    cfg.alpha_pattern = {**(cfg.alpha_pattern or {}), f"^{HEAD}$": k}


def head_of(model: nn.Module) -> LoraLinear | None:
    """The answer head of a (peft or Opacus-wrapped) causal LM, or None."""
    for module in model.modules():
        if isinstance(module, LoraLinear) and isinstance(module.lora_dropout["default"], Whiten):
            return module
    return None


def fixed_keys(model: nn.Module, state: Sequence[str]) -> set[str]:
    """Keys of peft's state that are the answer head's fixed selector: public, never exchanged."""
    return {k for k in state if f"{HEAD}.lora_B." in k} if head_of(model) is not None else set()


def head_logits(head: nn.Module, picked: torch.Tensor, states: torch.Tensor, index: tuple[torch.Tensor, ...]
                ) -> torch.Tensor:
    """The LM head's logits at the ``picked`` positions (N, d). With the answer head, its LoRA runs
    on ``states`` with their batch dimension ((B, R, d) or (B, T, d)) so that Opacus sees one
    example per row, and the ``index`` into them gives the picked rows."""
    if not isinstance(head, LoraLinear) or not isinstance(head.lora_dropout["default"], Whiten):
        return head(picked)
    z = head.lora_A["default"](head.lora_dropout["default"](states))[index] * head.scaling["default"]  # (N, k)
    if z.shape[0] < picked.shape[0]:  # the zero rows head_rows pads with
        z = torch.cat([z, z.new_zeros((picked.shape[0] - z.shape[0], z.shape[1]))])
    # One product [h, z] · [W, S]ᵀ (S: the selector's rows) gives W h + S z without a second
    # N × vocabulary tensor: adding z to k columns of the logits copies all of them (~0.2 s a step).
    w = _augmented(head, picked)
    x = torch.cat([picked, z.to(picked.dtype), picked.new_zeros((picked.shape[0], w.shape[1] - picked.shape[1] - z.shape[1]))],
                  dim=-1)
    return nn.functional.linear(x, w, getattr(head.base_layer, "bias", None))


def _augmented(head: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """[W, S, 0] in the dtype the product runs in (width a multiple of 16), kept while W is unchanged
    (its version counter)."""
    w = head.base_layer.weight
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    key = (dtype, w.device, w.data_ptr(), w._version)
    kept = head.__dict__.get("_fedpeft_augmented")
    if kept is None or kept[0] != key:
        with torch.no_grad():
            sel = head.lora_B["default"].weight.detach().to(w.dtype)
            pad = sel.new_zeros((sel.shape[0], -(w.shape[1] + sel.shape[1]) % 16))  # an odd width runs slower
            kept = (key, torch.cat([w.detach(), sel, pad], dim=1).to(dtype))
        head.__dict__["_fedpeft_augmented"] = kept
    return kept[1]


@torch.no_grad()
def recentre(model: nn.Module, tok: object, prompts: Sequence[str], *, precision: str = "float32",
             batch_size: int = 32) -> torch.Tensor:
    """Shift V's bias column (in place) so that the choices' mean logits over public ``prompts`` are
    equal; return the offsets taken off. Post-processing of a released adapter with public data
    only ("calibrate before use", Zhao et al. 2021): epsilon is unchanged.

    Why: the head adds to the base model's own choice logits, and SmolLM2 prefers one specialty for
    most referrals. A DP adapter's 24 noisy steps leave much of that lean; recentring it took the
    DP arm from 0.36 to 0.46 and the non-DP arm from 0.71 to 0.74 (docs/benchmarks.md, ninth session)."""
    from fedpeft import models

    head = head_of(model)
    if head is None:
        raise AnswerHeadError("recentre: the model has no answer head")
    whiten = head.lora_dropout["default"]
    assert isinstance(whiten, Whiten)
    device = head.lora_A["default"].weight.device
    sel = head.lora_B["default"].weight.detach().nonzero()  # (token, choice) pairs, in token order
    ids = sel[sel[:, 1].argsort(), 0].to(device)  # choice c's token: V's row c adds to its logit
    h = answer_states(model, tok, prompts, precision=precision, batch_size=batch_size).to(device)
    with models.autocast(device, precision):
        lg = head(h)[:, ids].float()
    bias = whiten(h)[:, whiten.j].float()
    offsets = lg.mean(0) - lg.mean()
    feature = bias.mean()  # the bias feature h_j / mu_j is near 1, not exactly 1
    weight = head.lora_A["default"].weight
    weight[:, whiten.j] -= (offsets / feature / head.scaling["default"]).to(weight.dtype)
    return offsets.cpu()


@contextlib.contextmanager
def plain_peft(model: nn.Module) -> Iterator[None]:
    """Within: the head's LoRA A is V·M and its dropout slot an identity, what plain peft computes."""
    head = head_of(model)
    if head is None:
        yield
        return
    whiten = head.lora_dropout["default"]
    assert isinstance(whiten, Whiten)
    weight = head.lora_A["default"].weight
    v = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(v @ whiten.matrix.to(v.dtype))
    head.lora_dropout["default"] = nn.Identity()
    try:
        yield
    finally:
        head.lora_dropout["default"] = whiten
        with torch.no_grad():
            weight.copy_(v)


def from_saved(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved (plain-PEFT) adapter's tensors as ``model`` exchanges them: the selector dropped
    (refused if it is not this model's) and the head's A taken back to V = A M⁻¹."""
    head = head_of(model)
    if head is None:
        return dict(tensors)
    whiten = head.lora_dropout["default"]
    assert isinstance(whiten, Whiten)
    mine = head.lora_B["default"].weight.detach().cpu()
    for k in [k for k in tensors if f"{HEAD}.lora_B." in k]:
        if not torch.equal(tensors[k].to(mine.dtype), mine):
            raise AnswerHeadError(f"{k}: the saved answer head selects other tokens than answer-choices gives")
    return exchanged(tensors, whiten)


def exchanged(tensors: Mapping[str, torch.Tensor], whiten: Whiten) -> dict[str, torch.Tensor]:
    """Saved tensors in the coordinates sites exchange: the selector (public, fixed) dropped and the
    head's A taken back to V = A M⁻¹ (float64 solve). Needs no model: an auditor builds ``whiten``
    from the statistics file beside a checkpoint."""
    out = {k: v for k, v in tensors.items() if f"{HEAD}.lora_B." not in k}
    for k in [k for k in out if f"{HEAD}.lora_A." in k]:
        out[k] = torch.linalg.solve(whiten.matrix.double().cpu(), out[k].double(), left=False).to(out[k].dtype)
    return out


def saved_step(mean_v: torch.Tensor, before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor],
               whiten: Whiten, tol_v: float) -> tuple[float, float]:
    """How far a round's saved head update is from the sites' mean update ``mean_v`` (in V), and the
    tolerance, compared in plain peft's coordinates: A_after - A_before against mean_v M. ``before``
    and ``after``: (A as saved, V read back). The tolerance carries ``tol_v`` (V's own) through M,
    plus the rounding of each saved float32 product V M over the width (γ_n |V| |M|): in A's
    coordinates nothing is amplified by M⁻¹ (condition ~300 for SmolLM2)."""
    m = whiten.matrix.double().cpu()
    predicted = mean_v.double() @ m
    step = after[0].double() - before[0].double()
    gamma = (m.shape[0] + 2) * torch.finfo(torch.float32).eps
    tol = tol_v * float(m.abs().sum(0).max()) + gamma * float(((before[1].double().abs() + after[1].double().abs())
                                                               @ m.abs()).max())
    return float((predicted - step).abs().max()), tol


STATISTICS_FILE = "answer_head_statistics.safetensors"  # beside a checkpoint: the public mean and sd behind M


def save_statistics(model: nn.Module, folder: Path) -> None:
    """Write the head's public statistics into a saved adapter's ``folder`` (nothing without a head),
    so the saved A reads back to the exchanged V with no model (``read_statistics``)."""
    from safetensors.torch import save_file

    head = head_of(model)
    if head is not None:
        whiten = head.lora_dropout["default"]
        assert isinstance(whiten, Whiten)
        mu, sd = whiten.statistics
        save_file({"mean": mu.contiguous().cpu(), "std": sd.contiguous().cpu()}, str(folder / STATISTICS_FILE))


def read_statistics(folder: Path) -> Whiten | None:
    """The whitening a saved adapter's head was trained in, or None when it has no head."""
    from safetensors.torch import load_file

    if not (folder / STATISTICS_FILE).exists():
        return None
    saved = load_file(str(folder / STATISTICS_FILE))
    return Whiten(saved["mean"], saved["std"])


def clip_norms(named: Sequence[tuple[str, nn.Parameter]], total: float, share: float) -> list[float] | None:
    """Per-tensor clipping norms (Opacus' per-layer clipping) that give the head ``share`` of the
    squared norm and split the rest evenly over the other tensors: the norms' root sum of squares
    is ``total``, so one example's whole gradient is still bounded by it (same noise, same ε).
    None when there is no head."""
    is_head = [f"{HEAD}.lora_A" in n for n, _ in named]
    if not any(is_head) or all(is_head):
        return None
    rest = len(is_head) - sum(is_head)
    return [total * math.sqrt(share / sum(is_head)) if h else total * math.sqrt((1.0 - share) / rest)
            for h in is_head]
