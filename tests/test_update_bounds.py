"""The server's update bounds (``fedpeft.update_bounds``): hand-computed values, and real DP
training on every device stays inside them while a scaled delta does not."""

from __future__ import annotations

import math

import pytest

from fedpeft import adapters, training
from fedpeft.config import PrivacyConfig, RunConfig, TrainConfig
from fedpeft.reply import Reply
from fedpeft.update_bounds import adam_update_bound, sgd_update_bound, update_bound
from tests.conftest import make_tiny_lora


def test_sgd_bound_equals_the_hand_computed_value():
    # Prepare: n=20 notes, batch 10 -> q=1/2, 2 steps, expected batch 10; C=0.5; lr 0.3 (adapter x 0.1)
    cfg = RunConfig(train=TrainConfig(optimizer="sgd", lr=0.3, batch_size=10),
                    privacy=PrivacyConfig(enabled=True, max_grad_norm=0.5))
    # Execute
    got = sgd_update_bound(cfg, 20, noise_multiplier=2.0, coordinates=5)
    # Assert: z from 5 coordinates x 2 steps at 1e-9; momentum reach 1 + 1.9 = 2.9
    z = math.sqrt(2 * math.log(2 * 5 * 2 / 1e-9))
    assert got == pytest.approx(1.02 * 0.3 * (0.5 * (20 + z * 2.0) / 10) * 2.9, rel=1e-12)
    # AdamW: 2 steps x lr x (1 - 0.9) / sqrt(1 - 0.999)
    assert adam_update_bound(cfg, 20) == pytest.approx(1.02 * 2 * 0.3 * 0.1 / math.sqrt(0.001), rel=1e-12)


def test_no_bound_without_dp():
    assert update_bound(RunConfig(privacy=PrivacyConfig(enabled=False))) is None


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_honest_dp_training_stays_inside_the_bound_and_a_scaled_delta_does_not(tiny_dataset, dp_on, device,
                                                                               optimizer):
    # Prepare: one honest DP round of local training with each optimiser
    train = TrainConfig(optimizer=optimizer, lr=0.05, batch_size=8, local_epochs=1, seed=0)
    cfg = RunConfig(train=train, privacy=dp_on)
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=train, privacy=dp_on, num_rounds=1)
    model = make_tiny_lora()
    before = {k: v.clone() for k, v in adapters.get_adapter_state(model).items()}
    # Execute
    training.train_local(model, tiny_dataset, train=train, privacy=dp_on, privacy_state=state,
                         device=device, seed=0, noise_seed=1)
    after = adapters.get_adapter_state(model)
    delta = {k: (after[k] - before[k]).cpu() for k in before}
    reply = Reply("trained", delta, {"site": 0.0, "num-examples": float(len(tiny_dataset)),
                                     "noise-multiplier": state.noise_multiplier})
    bound = update_bound(cfg)(reply)
    worst = max(float(v.abs().max()) for v in delta.values())
    # Assert: the honest round moved something, and no coordinate further than the bound; a
    # 100x scaled copy of the same delta is beyond it (the bound is not vacuous)
    assert 0 < worst <= bound
    assert 100 * worst > bound
