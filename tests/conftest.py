"""Shared fixtures: tiny random BERTs built in-process (no files, no network)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*(Secure RNG|Full backward hook|is_gradient_checkpointing).*")

from fedpeft import adapters, models, training  # noqa: E402
from fedpeft.config import AdapterConfig, ModelConfig, PrivacyConfig, TrainConfig  # noqa: E402

CPU = torch.device("cpu")
NUM_LABELS = 7
# Every device present: a contract that holds on the CPU must hold on CUDA too.
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, ids=lambda d: d.type)
def device(request, monkeypatch) -> torch.device:
    """Each device-dependent test runs once per device; fedpeft.site picks it up via $FEDPEFT_DEVICE."""
    monkeypatch.setenv("FEDPEFT_DEVICE", request.param.type)
    return request.param


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(name="tiny", max_length=32, seed=0)


@pytest.fixture
def tokenizer():
    return models.load_tokenizer("tiny")


def make_tiny_lora(*, dp: bool = True, rank: int = 4, seed: int = 0, method: str = "lora"):
    base = models.load_base_model(ModelConfig(name="tiny", seed=seed), num_labels=NUM_LABELS)
    return adapters.create_adapter(base, AdapterConfig(method=method, rank=rank, layers=""), dp=dp, base_name="tiny")


@pytest.fixture
def tiny_dataset(tokenizer):
    from fedpeft.data.notes import generate_notes

    texts, labels = generate_notes(n=48, seed=3)
    return training.encode(texts, labels, tokenizer, max_length=32)


@pytest.fixture
def fast_train() -> TrainConfig:
    return TrainConfig(lr=1e-2, batch_size=8, local_epochs=1, seed=0)


@pytest.fixture
def dp_on() -> PrivacyConfig:
    return PrivacyConfig(enabled=True, target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0)
