"""Evaluation metrics against hand-computed values; non-private path; device choice."""

from __future__ import annotations

import pytest
import torch

from fedpeft import models, training
from fedpeft.config import PrivacyConfig
from tests.conftest import CPU, NUM_LABELS, make_tiny_lora


def test_macro_f1_hand_computed():
    # true: 0 0 1 1 2 ; pred: 0 1 1 1 0
    # class0: tp1 fp1 fn1 -> 0.5 ; class1: tp2 fp1 fn0 -> 0.8 ; class2: tp0 fp0 fn1 -> 0
    pred = torch.tensor([0, 1, 1, 1, 0])
    true = torch.tensor([0, 0, 1, 1, 2])
    assert training.macro_f1(pred, true, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_non_private_training_learns(tiny_dataset, fast_train):
    # Prepare
    model = make_tiny_lora(dp=False)
    before = training.evaluate(model, tiny_dataset, device=CPU, num_labels=NUM_LABELS)
    # Execute: a few epochs on the same small set
    for r in range(8):
        res = training.train_local(model, tiny_dataset, train=fast_train, privacy=PrivacyConfig(enabled=False),
                                   privacy_state=None, device=CPU, seed=r)
    after = training.evaluate(model, tiny_dataset, device=CPU, num_labels=NUM_LABELS)
    # Assert
    assert res.epsilon == 0.0 and res.privacy_state is None
    assert after.loss < before.loss


def test_dp_requires_a_privacy_state(tiny_dataset, fast_train, dp_on):
    with pytest.raises(ValueError, match="privacy_state is required"):
        training.train_local(make_tiny_lora(), tiny_dataset, train=fast_train, privacy=dp_on,
                             privacy_state=None, device=CPU, seed=0)


def test_device_selection(monkeypatch):
    monkeypatch.delenv("FEDPEFT_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.select_device().type == expected
    assert models.select_device("cpu").type == "cpu"
