"""Centralised (pooled) training on the union of all sites: the upper-bound baseline."""

from __future__ import annotations

import dataclasses
import logging

import torch

from fedpeft import adapters, factory, models, training
from fedpeft.config import RunConfig
from fedpeft.data.sites import global_test_examples, make_site
from fedpeft.tasks import task_of

log = logging.getLogger(__name__)


def pooled_data(cfg: RunConfig) -> tuple[list[str], list[int], list[str]]:
    texts: list[str] = []
    labels: list[int] = []
    targets: list[str] = []
    for s in range(cfg.federation.num_sites):
        data = make_site(s, cfg.federation.num_sites, cfg.data, seed=cfg.train.seed, task=cfg.model.task)
        texts += data.train_texts
        labels += data.train_labels
        targets += data.train_targets
    return texts, labels, targets


def train_centralised(cfg: RunConfig, *, epochs: int, device: torch.device | None = None) -> dict[str, float]:
    """Train one adapter on the pooled data (DP per ``cfg.privacy``) and score it on the global test
    set: the task's metrics (``accuracy`` is its primary one)."""
    device = device or models.select_device()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=0))  # whole passes: "epochs"
    train_ds = factory.dataset(cfg, *pooled_data(cfg))
    test_ds = factory.dataset(cfg, *global_test_examples(cfg.data, seed=cfg.train.seed, task=cfg.model.task))
    model = factory.build_model(cfg, dp=cfg.privacy.enabled)
    # The federation's own round-0 adapter: a seeded start (torch's default seed differs per process)
    adapters.set_adapter_state(model, factory.initial_adapter_state(cfg))
    state = None
    if cfg.privacy.enabled:
        state = training.plan_privacy(num_examples=len(train_ds), train=cfg.train, privacy=cfg.privacy,
                                      num_rounds=epochs)
    for epoch in range(epochs):
        res = training.train_local(model, train_ds, train=cfg.train, privacy=cfg.privacy, privacy_state=state,
                                   device=device, seed=cfg.train.seed + epoch, precision=cfg.model.precision,
                                   task=task_of(cfg.model))
        state = res.privacy_state
        log.info("centralised epoch %d: loss %.4f eps %.3f", epoch + 1, res.loss, res.epsilon)
    return task_of(cfg.model).evaluate(model, test_ds, device=device, precision=cfg.model.precision,
                                       num_labels=len(cfg.data.label_list), cfg=cfg.model)
