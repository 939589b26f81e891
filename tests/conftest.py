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
# One Ray worker for a simulation whose sites need not run side by side: every worker imports torch,
# transformers, peft and opacus afresh (~10 s of CPU here), and the suite's other process keeps the
# second core busy anyway.
ONE_WORKER = f"client-cpus={os.cpu_count() or 1}"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that runs app code (``clients.client_app`` sets torch's threads from client-cpus)
    leaves this worker's thread count as it found it, for the tests after it."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


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


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Fail any test that leaves a child process running (a SuperLink, a SuperNode, a simulation,
    Ray's daemons), after killing it so the next test starts clean. Ray and Flower need a moment to
    exit after a shutdown, so stragglers get a grace period first."""
    import time

    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    _reset_cli_logging()
    deadline = time.monotonic() + 15.0
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before and _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if left:
        names = [" ".join(_cmdline(p))[:120] for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail(f"the test left {len(left)} process(es) running: {names}")


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except psutil.Error:
        return [str(p.pid)]


def _reset_cli_logging() -> None:
    """``fedpeft.cli.main`` configures process-wide logging (no propagation to root); tests that
    call it in-process must not change what the next test's ``caplog`` sees."""
    import logging

    log = logging.getLogger("fedpeft")
    log.propagate = True
    log.handlers = [h for h in log.handlers if not getattr(h, "_fedpeft", False)]



def one_private_site_round(cfg, device: torch.device):
    """Site 0 of 2 trains one DP round of ``cfg`` (a causal-lm run) from the round-0 adapter:
    (the round-0 state, the trained state, the TrainResult)."""
    from fedpeft import factory
    from fedpeft.data.sites import make_site
    from fedpeft.tasks import task_of

    start = factory.initial_adapter_state(cfg)
    net = factory.worker_model(cfg, start)
    site = make_site(0, 2, cfg.data, seed=0, task="causal-lm")
    data = factory.dataset(cfg, site.train_texts, site.train_labels, site.train_targets)
    state = training.plan_privacy(num_examples=len(data), train=cfg.train, privacy=cfg.privacy, num_rounds=2)
    res = training.train_local(net, data, train=cfg.train, privacy=cfg.privacy, privacy_state=state, device=device,
                               seed=1, task=task_of(cfg.model))
    return start, adapters.get_adapter_state(net), res, (net, data)
