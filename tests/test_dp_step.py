"""DP training steps on every device present: epsilon across calls and restarts, and Opacus'
clipped per-sample gradients against a brute-force loop. No hypothesis here, so the GPU kit runs it."""

from __future__ import annotations

import pytest
import torch

from fedpeft import training
from fedpeft.config import PrivacyConfig, TrainConfig
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


def test_local_steps_take_a_fraction_of_a_pass_at_the_pass_sampling_rate(tiny_dataset, dp_on, device):
    from dataclasses import replace

    from opacus.accountants.utils import get_noise_multiplier

    # Prepare: 48 notes at expected batch 8 (q = 1/6), 2 steps per round for 3 rounds
    train = TrainConfig(lr=1e-2, batch_size=8, local_steps=2, seed=0)
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=train, privacy=dp_on, num_rounds=3)
    # Assert: sigma is calibrated for 6 steps at q = 1/6 (Opacus' own calibration as the oracle), below
    # the sigma that three whole passes (18 steps) would need
    assert state.sample_rate == pytest.approx(1 / 6, rel=1e-12) and state.planned_steps == 6
    oracle = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=1 / 6, steps=6,
                                  accountant="rdp", epsilon_tolerance=0.01)
    assert state.noise_multiplier == pytest.approx(oracle, rel=0.02)
    whole = training.plan_privacy(num_examples=len(tiny_dataset), train=replace(train, local_steps=0), privacy=dp_on,
                                  num_rounds=3)
    assert state.noise_multiplier < 0.9 * whole.noise_multiplier
    # Execute: one round, with DP and without
    model = make_tiny_lora()
    res = training.train_local(model, tiny_dataset, train=train, privacy=dp_on, privacy_state=state, device=device,
                               seed=1)
    plain = training.train_local(make_tiny_lora(dp=False), tiny_dataset, train=train,
                                 privacy=replace(dp_on, enabled=False), privacy_state=None, device=device, seed=1)
    # Assert: exactly 2 steps each; the accountant counted those 2 at q = 1/6 and epsilon is theirs
    assert res.steps == 2 and plain.steps == 2
    assert [tuple(h) for h in res.privacy_state.history] == [(state.noise_multiplier, state.sample_rate, 2)]
    assert res.epsilon == pytest.approx(
        compute_epsilon(history=[(state.noise_multiplier, 1 / 6, 2)], delta=1e-5), rel=1e-9)


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
    for _, p in model.named_parameters():  # make lora_B non-zero so every LoRA path carries gradient
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


def test_drawn_counts_the_examples_of_the_poisson_batches_and_every_example_without_dp(tiny_dataset, fast_train, dp_on):
    # Prepare: the per-sample gradients Opacus holds at each release are the oracle for what was drawn
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=fast_train, privacy=dp_on, num_rounds=2)
    model = make_tiny_lora()
    first = next(p for p in model.parameters() if p.requires_grad)
    released: list[int] = []
    # Execute
    dp = training.train_local(model, tiny_dataset, train=fast_train, privacy=dp_on, privacy_state=state,
                              device=torch.device("cpu"), seed=0, noise_seed=5,
                              before_release=lambda: released.append(int(first.grad_sample.shape[0])))
    plain = training.train_local(make_tiny_lora(dp=False), tiny_dataset, train=fast_train,
                                 privacy=PrivacyConfig(enabled=False), privacy_state=None, device=torch.device("cpu"),
                                 seed=0)
    # Assert: one release per step; drawn is their sum (a random count); without DP every example once per epoch
    assert len(released) == dp.steps == len(tiny_dataset) // fast_train.batch_size
    assert dp.drawn == sum(released)
    assert plain.drawn == len(tiny_dataset) * fast_train.local_epochs
