"""Centralised (pooled) training on the union of all sites: the upper-bound baseline."""

from __future__ import annotations

import logging

import torch

from fedpeft import adapters, models, training
from fedpeft.config import RunConfig
from fedpeft.data.sites import global_test_set, make_site

log = logging.getLogger(__name__)


def pooled_data(cfg: RunConfig) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    for s in range(cfg.federation.num_sites):
        site = make_site(s, cfg.federation.num_sites, cfg.data, seed=cfg.train.seed)
        texts += site.train_texts
        labels += site.train_labels
    return texts, labels


def train_centralised(cfg: RunConfig, *, epochs: int, device: torch.device | None = None) -> training.EvalResult:
    """Train one adapter on the pooled data (DP per ``cfg.privacy``) and score it on the global test set."""
    device = device or models.select_device()
    labels = cfg.data.label_list
    tok = models.load_tokenizer(cfg.model.name)
    texts, ys = pooled_data(cfg)
    train_ds = training.encode(texts, ys, tok, max_length=cfg.model.max_length)
    tt, ty = global_test_set(cfg.data, seed=cfg.train.seed)
    test_ds = training.encode(tt, ty, tok, max_length=cfg.model.max_length)
    base = models.load_base_model(cfg.model, num_labels=len(labels), labels=labels)
    model = adapters.create_adapter(base, cfg.adapter, dp=cfg.privacy.enabled, base_name=cfg.model.name)
    state = None
    if cfg.privacy.enabled:
        state = training.plan_privacy(num_examples=len(train_ds), train=cfg.train, privacy=cfg.privacy,
                                      num_rounds=epochs)
    for epoch in range(epochs):
        res = training.train_local(model, train_ds, train=cfg.train, privacy=cfg.privacy, privacy_state=state,
                                   device=device, seed=cfg.train.seed + epoch)
        state = res.privacy_state
        log.info("centralised epoch %d: loss %.4f eps %.3f", epoch + 1, res.loss, res.epsilon)
    return training.evaluate(model, test_ds, device=device, num_labels=len(labels))
