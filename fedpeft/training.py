"""Site-side training and evaluation loops (no Flower here).

DP-SGD is Opacus: Poisson sampling, per-sample clipping and Gaussian noise with a sigma that was
calibrated once for the whole planned training (``PrivacyState``); the accountant is restored from
that state on every call, so epsilon accumulates across rounds instead of restarting.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpeft.config import PrivacyConfig, TrainConfig
from fedpeft.methods import after_step, check_grad_samples
from fedpeft.methods.answer_head import clip_norms, head_of
from fedpeft.methods.inserted import INSERTED
from fedpeft.models import autocast, physical_batch_size
from fedpeft.prefix import length_batches, start_of, trim
from fedpeft.privacy.accountant import PrivacyState, new_privacy_state
from fedpeft.privacy.events import history_of

if TYPE_CHECKING:
    from fedpeft.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    loss: float
    steps: int
    examples: int
    epsilon: float  # cumulative epsilon for this site after this call (0 without DP)
    privacy_state: PrivacyState | None
    pass_seconds: float = 0.0  # time in forward and backward passes alone (the arithmetic of this call)
    drawn: int = 0  # examples in the batches this call trained on (under DP a Poisson draw: it varies)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    macro_f1: float
    examples: int


def encode(texts: Sequence[str], labels: Sequence[int], tokenizer, *, max_length: int) -> TensorDataset:
    """Tokenise once, padded to the longest note (capped at ``max_length``)."""
    if len(texts) != len(labels):
        raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) differ in length")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(list(labels), dtype=torch.long))


def expected_sample_rate(*, num_examples: int, batch_size: int) -> float:
    """Poisson rate q as Opacus' DPDataLoader derives it (1 / batches per epoch)."""
    return 1.0 / max(1, math.ceil(num_examples / batch_size))


def steps_per_round(*, num_examples: int, batch_size: int, local_epochs: int, local_steps: int = 0) -> int:
    """Optimizer steps a site takes per round: ``local_steps`` when set, else whole passes."""
    if local_steps > 0:
        return local_steps
    return local_epochs * max(1, math.ceil(num_examples / batch_size))


def plan_privacy(
    *, num_examples: int, train: TrainConfig, privacy: PrivacyConfig, num_rounds: int
) -> PrivacyState:
    """Calibrate sigma for the site's planned participation (``dp-planned-rounds``, default every
    round of the run); a site asked to train beyond it declines once its budget would be exceeded."""
    q = expected_sample_rate(num_examples=num_examples, batch_size=train.batch_size)
    rounds = privacy.planned_rounds or num_rounds
    steps = rounds * steps_per_round(num_examples=num_examples, batch_size=train.batch_size,
                                     local_epochs=train.local_epochs, local_steps=train.local_steps)
    return new_privacy_state(target_epsilon=privacy.target_epsilon, target_delta=privacy.target_delta,
                             max_grad_norm=privacy.max_grad_norm, sample_rate=q, planned_steps=steps,
                             accountant=privacy.accountant)


def _optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Two groups: the classification head at ``lr``, adapter tensors at ``lr * adapter_lr_scale``."""
    head: list[torch.nn.Parameter] = []
    adapter: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:  # the head is peft's modules_to_save, less the modules a method inserted
            (head if "modules_to_save" in name and not any(m in name for m in INSERTED) else adapter).append(p)
    groups = [g for g in ({"params": head, "lr": train.lr},
                          {"params": adapter, "lr": train.lr * train.adapter_lr_scale}) if g["params"]]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=0.0)


def logits_of(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, **start: Any) -> torch.Tensor:
    """Logits for token ids, or for cached states (``start``: ``prefix.start_of`` of the dataset)."""
    x, mask = trim(x, mask)
    if start:
        return model(prefix_hidden=x, attention_mask=mask, **start).logits
    return model(input_ids=x, attention_mask=mask).logits


def _float32_grad_samples(params: Sequence[nn.Parameter]) -> None:
    """Per-sample gradients in the parameters' dtype before Opacus clips them.

    Under autocast Opacus' samplers return bfloat16 and it takes the norms in bfloat16 (~0.4 %
    error), so a clipped gradient could exceed C; in float32 the sensitivity bound is exact.
    """
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.dtype != p.dtype:
            p.grad_sample = gs.to(p.dtype)
        elif isinstance(gs, list):
            p.grad_sample = [g.to(p.dtype) for g in gs]


def train_local(
    model: nn.Module,
    data: TensorDataset,
    *,
    train: TrainConfig,
    privacy: PrivacyConfig,
    privacy_state: PrivacyState | None,
    device: torch.device,
    seed: int,
    noise_seed: int | None = None,
    anchor: Mapping[str, torch.Tensor] | None = None,
    precision: str = "float32",
    before_step: Callable[[int], None] | None = None,
    before_release: Callable[[], None] | None = None,
    task: Task | None = None,
) -> TrainResult:
    """Train the adapter in place for ``train.local_epochs`` (or ``train.local_steps`` steps).

    ``before_step(k)`` runs before the k-th private step draws its noise (write-ahead accounting:
    a crash after it still leaves the step counted); it may raise to abort the round.
    ``before_release()`` runs when a batch's per-sample gradients are in ``p.grad_sample``, just
    before the step that clips them and adds the noise (audit canaries join the batch there).

    With ``privacy.enabled`` a ``privacy_state`` is required (see ``plan_privacy``); the returned
    state carries the extended accountant history. ``anchor`` (parameter name -> global value)
    turns on FedProx's proximal step, applied after the private step since it touches no data.
    ``precision='bfloat16'`` runs forward and backward under autocast; parameters, optimizer state,
    clipping and noise stay float32.

    ``seed`` drives what carries no privacy (dropout, non-private shuffling). DP noise and Poisson
    sampling come from ``noise_seed``; when it is None (the default) from the operating system's
    entropy, so nobody, the coordinator included, can regenerate them. Pass a seed only for
    reproducible simulations (``dp-noise='seeded'``).

    ``task`` (default classification) gives the loss: one number per example, then the batch mean.
    """
    if task is None:
        from fedpeft.tasks import TASKS

        task = TASKS.get("classification")
    torch.manual_seed(seed)
    round_steps = steps_per_round(num_examples=len(data), batch_size=train.batch_size,
                                  local_epochs=train.local_epochs, local_steps=train.local_steps)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, train)
    if privacy.enabled:
        source = noise_seed if noise_seed is not None else secrets.randbits(63)
        sampling_gen = torch.Generator().manual_seed(source)  # Opacus draws Poisson masks on the CPU
        # Opacus draws noise with torch.normal(device=param.device, generator=g): g must live there too.
        noise_gen = torch.Generator(device=device).manual_seed(source ^ 0x5EED5EED)
    else:
        sampling_gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=train.batch_size, shuffle=not privacy.enabled, generator=sampling_gen)
    criterion: nn.Module = nn.CrossEntropyLoss()
    engine = hooks = None
    if privacy.enabled:
        if privacy_state is None:
            raise ValueError("privacy_state is required when dp is enabled (see plan_privacy)")
        from opacus import PrivacyEngine

        q = expected_sample_rate(num_examples=len(data), batch_size=train.batch_size)
        if not math.isclose(q, privacy_state.sample_rate, rel_tol=1e-9):
            raise ValueError(f"sample_rate={q!r} differs from the calibrated {privacy_state.sample_rate!r}: "
                             "the site's data size or batch size changed since calibration")
        # The budget, not the plan, is the limit: decline before any noise is drawn.
        privacy_state.check_budget(round_steps)
        with warnings.catch_warnings():  # "Secure RNG turned off": see docs/privacy.md (secret seeds, not torchcsprng)
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=privacy_state.accountant)
            engine.accountant.load_state_dict(
                {"history": list(privacy_state.history), "mechanism": engine.accountant.mechanism()}
            )
            # with an answer head, its own share of the clipping norm (per-layer clipping, same total)
            names = {id(p): n for n, p in model.named_parameters()}
            norms = None if head_of(model) is None else clip_norms(
                [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]],
                privacy_state.max_grad_norm, privacy.head_clip_share)
            out = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                noise_multiplier=privacy_state.noise_multiplier,
                max_grad_norm=norms if norms is not None else privacy_state.max_grad_norm,
                clipping="per_layer" if norms is not None else "flat",
                poisson_sampling=True, grad_sample_mode=privacy.grad_sample_mode, wrap_model=False,
                noise_generator=noise_gen,
            )
        if privacy.grad_sample_mode == "ghost":
            hooks, optimizer, criterion, loader = out
        else:
            hooks, optimizer, loader = out
        # Opacus' defence against floating-point attacks on Gaussian sampling (each noise value the
        # mean of 4 draws, Holohan & Braghin 2021), with our secret-seeded generator: its own
        # secure_mode would also demand torchcsprng, which is unmaintained.
        optimizer.secure_mode = True
    named = dict(model.named_parameters())
    start = start_of(data)
    # Ghost clipping needs the whole batch in one backward pass.
    physical = (None if privacy.enabled and privacy.grad_sample_mode == "ghost"
                else physical_batch_size(train.max_physical_batch_size, device))
    total, steps, seen, pass_s = 0.0, 0, 0, 0.0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Secure RNG|Full backward hook).*")
            for batch in itertools.islice(_passes(loader), round_steps):
                if before_step is not None and engine is not None:
                    before_step(steps + 1)
                if batch[0].shape[0] == 0:  # Poisson sampling drew nobody: release noise only
                    optimizer.zero_grad(set_to_none=True)
                    for p in params:  # an empty per-sample gradient; Opacus adds the noise and counts the step
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    if before_release is not None:
                        before_release()
                    optimizer.step()
                    after_step(model)
                    steps += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                n_batch = int(batch[-1].shape[0])
                chunks = _length_chunks(batch, physical)
                for j, chunk in enumerate(chunks):
                    t0 = time.perf_counter()
                    loss, n = task.batch_loss(model, chunk, device=device, start=start, precision=precision,
                                              criterion=criterion)
                    # plain accumulation weights each pass's mean into the batch mean; under DP Opacus
                    # scales per-sample gradients itself
                    (loss if engine is not None else loss * (n / n_batch)).backward()
                    total += float(loss.item()) * n  # .item() waits for the device: the pass is done
                    pass_s += time.perf_counter() - t0
                    if engine is None:
                        continue
                    # Opacus' skip-step (what its BatchMemoryManager drives, though that splits in arrival
                    # order, not by length): clip this pass's per-sample grads into the running sum and
                    # skip the step; noise is added once, on the batch's last pass.
                    _float32_grad_samples(params)
                    if privacy.grad_sample_mode != "ghost":  # ghost clipping keeps norms, not per-example gradients
                        check_grad_samples(params, n)
                    if j < len(chunks) - 1:
                        optimizer.signal_skip_step(do_skip=True)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                if before_release is not None and engine is not None:
                    before_release()
                optimizer.step()
                after_step(model)  # a method's projection of the released values (LoReFT), no data touched
                if anchor is not None and train.proximal_mu > 0:
                    _proximal_step(named, anchor, lr=train.lr, mu=train.proximal_mu)
                seen += n_batch
                steps += 1
    finally:
        if hooks is not None and hasattr(hooks, "cleanup"):
            hooks.cleanup()
    new_state = None
    eps = 0.0
    if engine is not None and privacy_state is not None:
        new_state = PrivacyState(**{**privacy_state.__dict__, "history": history_of(engine.accountant.history)})
        eps = new_state.epsilon()
    model.eval()
    return TrainResult(loss=total / max(seen, 1), steps=steps, examples=len(data), epsilon=eps,
                       privacy_state=new_state, pass_seconds=pass_s, drawn=seen)


def _passes(loader: DataLoader) -> Iterator[Sequence[torch.Tensor]]:
    """The loader's batches, pass after pass (each pass re-draws its Poisson or shuffled batches)."""
    while True:
        yield from loader


def _length_chunks(batch: Sequence[torch.Tensor], size: int | None) -> list[tuple[torch.Tensor, ...]]:
    """Split a batch into passes of at most ``size`` notes (None: one pass), shortest notes together."""
    if size is None or batch[0].shape[0] <= size:
        return [tuple(batch)]
    return [tuple(t[idx] for t in batch) for idx in length_batches(batch[1], size)]


@torch.no_grad()
def _proximal_step(named: Mapping[str, torch.nn.Parameter], anchor: Mapping[str, torch.Tensor],
                   *, lr: float, mu: float) -> None:
    for name, ref in anchor.items():
        p = named[name]
        p.sub_(lr * mu * (p - ref.to(p.device)))


@torch.no_grad()
def predict(model: nn.Module, data: TensorDataset, *, device: torch.device, batch_size: int = 128,
            precision: str = "float32") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(predicted labels, true labels, mean loss), in ``data``'s order."""
    model.to(device).eval()
    x_all, mask_all, y_all = data.tensors
    start = start_of(data)
    preds = torch.empty(len(y_all), dtype=torch.long)
    total = 0.0
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for idx in length_batches(mask_all, batch_size):
        with autocast(device, precision):
            logits = logits_of(model, x_all[idx].to(device), mask_all[idx].to(device), **start).float()
        total += float(criterion(logits, y_all[idx].to(device)))
        preds[idx] = logits.argmax(-1).cpu()
    return preds, y_all.clone(), total / max(len(data), 1)


def macro_f1(pred: torch.Tensor, true: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over classes present in truth or prediction."""
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(sum(f1s) / len(f1s)) if f1s else 0.0


def evaluate(model: nn.Module, data: TensorDataset, *, device: torch.device, num_labels: int,
             precision: str = "float32") -> EvalResult:
    """Loss, accuracy and macro-F1 on held-out data."""
    if len(data) == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), macro_f1=float("nan"), examples=0)
    pred, true, loss = predict(model, data, device=device, precision=precision)
    acc = float((pred == true).float().mean())
    return EvalResult(loss=loss, accuracy=acc, macro_f1=macro_f1(pred, true, num_labels), examples=len(data))
