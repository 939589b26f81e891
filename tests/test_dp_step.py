"""DP training steps on every device present: epsilon across calls and restarts, and Opacus'
clipped per-sample gradients against a brute-force loop. No hypothesis here, so the GPU kit runs it."""

from __future__ import annotations

import pytest
import torch

from fedpeft import training
from fedpeft.privacy.accountant import BudgetExceeded, PrivacyState, compute_epsilon
from tests.conftest import make_tiny_lora


def test_epsilon_accumulates_across_calls_and_restarts(tiny_dataset, fast_train, dp_on, device):
    # Prepare: the same 3 local rounds, once continuously and once through JSON "restarts"
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=fast_train, privacy=dp_on, num_rounds=3)
    model = make_tiny_lora()
    eps = []
    s = state
    for r in range(3):
        res = training.train_local(model, tiny_dataset, train=fast_train, privacy=dp_on, privacy_state=s,
                                   device=device, seed=r)
        s = PrivacyState.from_json(res.privacy_state.to_json())  # as if the process restarted
        eps.append(res.epsilon)
    # Assert: strictly increasing, ends at (not over) the target, matches one composed history
    assert eps[0] < eps[1] < eps[2] <= dp_on.target_epsilon
    assert eps[2] > 0.9 * dp_on.target_epsilon
    assert s.steps_taken == state.planned_steps
    whole = compute_epsilon(history=[(state.noise_multiplier, state.sample_rate, state.planned_steps)], delta=1e-5)
    assert eps[2] == pytest.approx(whole, rel=1e-9)
    # A fourth round would overspend: refused
    with pytest.raises(BudgetExceeded, match="target-epsilon=.*declining"):
        training.train_local(model, tiny_dataset, train=fast_train, privacy=dp_on, privacy_state=s, device=device, seed=9)


def test_dp_step_clipped_gradients_equal_brute_force_loop(tiny_dataset, device):
    """Guards against silent peft/Opacus breakage (opacus#820): float64, sigma=0."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    # Prepare
    torch.manual_seed(0)
    model = make_tiny_lora().double().to(device).train()  # Opacus records activations in train mode only
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # same function in the brute-force loop and the Opacus step
    for n, p in model.named_parameters():  # make lora_B non-zero so every LoRA path carries gradient
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.05 * torch.randn_like(p))
    data = TensorDataset(*(t[:6].to(device) for t in tiny_dataset.tensors))
    params = [p for p in model.parameters() if p.requires_grad]
    clip = 0.05
    ce = torch.nn.CrossEntropyLoss()
    brute = [torch.zeros_like(p) for p in params]
    for i in range(len(data)):
        ids, mask, y = (t[i : i + 1] for t in data.tensors)
        grads = torch.autograd.grad(ce(model(input_ids=ids, attention_mask=mask).logits, y), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)
        for acc, g in zip(brute, grads):
            acc.add_(g * factor)
    brute = [b / len(data) for b in brute]
    # Execute: one Opacus step with the same batch, no noise
    opt = torch.optim.SGD(params, lr=0.0)
    engine = PrivacyEngine(accountant="rdp")
    hooks, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=len(data)), noise_multiplier=0.0,
        max_grad_norm=clip, poisson_sampling=False, wrap_model=False,
    )
    ids, mask, y = next(iter(loader))
    ce(model(input_ids=ids, attention_mask=mask).logits, y).backward()
    opt.pre_step()
    # Assert
    assert len(params) > 2
    for p, b in zip(params, brute):
        torch.testing.assert_close(p.grad, b, rtol=1e-9, atol=1e-12)
    hooks.cleanup()
