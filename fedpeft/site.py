"""What one site does in a round, free of Flower types: load data, train the adapter with DP
starting from the global adapter, and return only the delta plus metrics.

The ClientApp calls these; privacy state goes in and out as JSON so it can live in Flower's
``context.state`` (and on disk) and epsilon keeps accumulating across rounds.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedpeft import adapters, models, prefix, training
from fedpeft.config import ModelConfig, RunConfig
from fedpeft.data.sites import SiteData, make_site
from fedpeft.privacy.accountant import PrivacyState

log = logging.getLogger(__name__)


class SiteError(RuntimeError):
    """This site cannot take part (missing or malformed data); the message names the site."""


@functools.lru_cache(maxsize=2)
def _base_model(model_fields: tuple, labels: tuple[str, ...]) -> torch.nn.Module:
    cfg = ModelConfig(*model_fields)  # the config's fields as a hashable cache key
    return models.load_base_model(cfg, num_labels=len(labels), labels=list(labels))


def base_model(cfg: RunConfig) -> torch.nn.Module:
    """This process's cached base model: read-only, copy it before wrapping."""
    return _base_model(dataclasses.astuple(cfg.model), tuple(cfg.data.label_list))


def build_model(cfg: RunConfig, *, dp: bool) -> adapters.PeftModel:
    """A fresh adapter on a copy of the cached base model."""
    return adapters.create_adapter(copy.deepcopy(base_model(cfg)), cfg.adapter, dp=dp, base_name=cfg.model.name)


def initial_adapter_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The round-0 global adapter (seeded, so every party can rebuild it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return adapters.get_adapter_state(build_model(cfg, dp=False))


_PREFIX_CACHE = prefix.PrefixCache()


def dataset(cfg: RunConfig, texts: list[str], labels: list[int]) -> TensorDataset:
    """Token dataset, or, when the adapter leaves the bottom layers frozen, their cached output
    (computed once per note set in this process; see ``fedpeft.prefix``)."""
    tok = models.load_tokenizer(cfg.model.name)
    start = prefix.prefix_start(cfg.model, cfg.adapter)
    if start == 0:
        return training.encode(texts, labels, tok, max_length=cfg.model.max_length)
    key = prefix.fingerprint(texts, labels, (dataclasses.astuple(cfg.model), start))  # the head is not cached
    ds = _PREFIX_CACHE.get(key)
    if ds is None:
        tokens = training.encode(texts, labels, tok, max_length=cfg.model.max_length)
        ds = prefix.compute_prefix(base_model(cfg), tokens, start_layer=start, precision=cfg.model.precision)
        _PREFIX_CACHE.put(key, ds)
    return ds


def load_site(cfg: RunConfig, *, site: int, num_sites: int, data_path: str | None = None) -> SiteData:
    try:
        data = make_site(site, num_sites, cfg.data, seed=cfg.train.seed, data_path=data_path)
    except Exception as e:
        raise SiteError(f"site {site}: cannot load data ({data_path or cfg.data.source}): {e}") from e
    if not data.train_texts:
        raise SiteError(f"site {site}: no training examples ({data_path or cfg.data.source})")
    return data


def round_seed(seed: int, site: int, server_round: int) -> int:
    return int(np.random.SeedSequence([seed, site, server_round, 17]).generate_state(1)[0] % (2**31))


def site_train(
    cfg: RunConfig, *, site: int, num_sites: int, server_round: int,
    global_state: Mapping[str, torch.Tensor], privacy_json: str | None, data_path: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], str | None]:
    """Train from the global adapter; return (delta = local - global, metrics, new privacy JSON)."""
    data = load_site(cfg, site=site, num_sites=num_sites, data_path=data_path)
    device = models.select_device()
    ds = dataset(cfg, data.train_texts, data.train_labels)
    model = build_model(cfg, dp=cfg.privacy.enabled)
    adapters.set_adapter_state(model, global_state)
    state = None
    if cfg.privacy.enabled:
        # Calibrated once, on first participation, for every round the run may give this site.
        state = (PrivacyState.from_json(privacy_json) if privacy_json else
                 training.plan_privacy(num_examples=len(ds), train=cfg.train, privacy=cfg.privacy,
                                       num_rounds=cfg.federation.num_rounds))
    anchor = None
    if cfg.train.proximal_mu > 0:
        named = dict(model.named_parameters())
        anchor = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    res = training.train_local(model, ds, train=cfg.train, privacy=cfg.privacy, privacy_state=state,
                               device=device, seed=round_seed(cfg.train.seed, site, server_round), anchor=anchor,
                               precision=cfg.model.precision)
    local = adapters.get_adapter_state(model)
    delta = {k: local[k] - global_state[k].to(local[k].dtype) for k in local}
    local_acc = float("nan")
    if data.test_texts:  # the locally trained adapter on this site's own held-out notes
        test = dataset(cfg, data.test_texts, data.test_labels)
        local_acc = training.evaluate(model, test, device=device, num_labels=len(cfg.data.label_list),
                                      precision=cfg.model.precision).accuracy
    metrics = {
        "site": float(site), "num-examples": float(len(ds)), "train-loss": res.loss, "steps": float(res.steps),
        "local-accuracy": local_acc,
        "epsilon": res.epsilon, "bytes-up": float(adapters.state_bytes(delta)),
        "noise-multiplier": state.noise_multiplier if state else 0.0,
    }
    return delta, metrics, (res.privacy_state.to_json() if res.privacy_state else None)


def site_evaluate(
    cfg: RunConfig, *, site: int, num_sites: int, global_state: Mapping[str, torch.Tensor],
    data_path: str | None = None,
) -> dict[str, float]:
    """Score the global adapter on this site's own held-out notes."""
    data = load_site(cfg, site=site, num_sites=num_sites, data_path=data_path)
    ds = dataset(cfg, data.test_texts or data.train_texts, data.test_labels or data.train_labels)
    model = build_model(cfg, dp=False)
    adapters.set_adapter_state(model, global_state)
    ev = training.evaluate(model, ds, device=models.select_device(), num_labels=len(cfg.data.label_list),
                           precision=cfg.model.precision)
    return {"site": float(site), "num-examples": float(ev.examples), "accuracy": ev.accuracy,
            "loss": ev.loss, "macro-f1": ev.macro_f1}
