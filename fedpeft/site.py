"""What one site does in a round, free of Flower types: load data, train the adapter with DP
starting from the global adapter, and return only the delta plus metrics.

The ClientApp calls these; privacy state goes in and out as JSON so it can live in Flower's
``context.state`` (and on disk) and epsilon keeps accumulating across rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedpeft import adapters, compression, models, prefix, ranks, training
from fedpeft.config import RunConfig
from fedpeft.data.sites import SiteData, make_site
from fedpeft.factory import dataset, evaluate, global_adapter_config, worker_model
from fedpeft.faults import InjectedFault, attacked, attackers, crashes, hangs, is_late
from fedpeft.policy import SiteError
from fedpeft.privacy.accountant import BudgetExceeded, PrivacyState
from fedpeft.privacy.audit.canaries import TrainingCanaries
from fedpeft.privacy.ledger import delta_hash
from fedpeft.privacy.vault import SiteVault, site_folder
from fedpeft.reply import Reply
from fedpeft.tasks import task_of

log = logging.getLogger(__name__)


def load_site(cfg: RunConfig, *, site: int, num_sites: int, data_path: str | None = None) -> SiteData:
    try:
        data = make_site(site, num_sites, cfg.data, seed=cfg.train.seed, data_path=data_path, task=cfg.model.task)
    except Exception as e:
        raise SiteError(f"site {site}: cannot load data ({data_path or cfg.data.source}): {e}") from e
    if not data.train_texts:
        raise SiteError(f"site {site}: no training examples ({data_path or cfg.data.source})")
    return data


@dataclasses.dataclass
class SiteWork:
    """What a site keeps across rounds in its worker: its notes and their (prefix) datasets."""

    data: SiteData
    train: TensorDataset
    test: TensorDataset | None

    @property
    def nbytes(self) -> int:
        """Its tensors, and what evaluation has kept on them since (``PrefixDataset.memo``)."""
        sets = [ds for ds in (self.train, self.test) if ds is not None]
        return sum(t.numel() * t.element_size() for ds in sets for t in ds.tensors) + sum(
            ds.memo_bytes for ds in sets if isinstance(ds, prefix.PrefixDataset))


def _file_stamp(path: str | None) -> tuple:
    """An edited site file is a different data set (size and modification time)."""
    if not path:
        return ()
    try:
        st = os.stat(path)
    except OSError:
        return (path,)  # load_site reports the missing file
    return (path, st.st_size, st.st_mtime_ns)


_SITES = prefix.BytesLRU(prefix.memory_budget())


def _work_key(cfg: RunConfig, site: int, num_sites: int, data_path: str | None) -> tuple:
    stamp = _file_stamp(data_path or (cfg.data.source.format(site=site) if "{site}" in cfg.data.source else None))
    task = task_of(cfg.model)
    return (site, num_sites, data_path, stamp, dataclasses.astuple(cfg.data), cfg.train.seed,
            dataclasses.astuple(cfg.model), task.prefix_start(cfg.model, cfg.adapter),
            task.ffn_start(cfg.model, cfg.adapter), str(models.select_device()))


def site_work(cfg: RunConfig, *, site: int, num_sites: int, data_path: str | None = None) -> SiteWork:
    """This site's data and datasets, built on first use in this worker and kept (bounded by the
    machine's memory; an evicted site's prefix comes back from the disk cache when one is set)."""
    return _work_at(_work_key(cfg, site, num_sites, data_path), cfg, site, num_sites, data_path)


def _work_at(key: tuple, cfg: RunConfig, site: int, num_sites: int, data_path: str | None) -> SiteWork:
    work = _SITES.get(key)
    if work is None:
        data = load_site(cfg, site=site, num_sites=num_sites, data_path=data_path)
        test = dataset(cfg, data.test_texts, data.test_labels, data.test_targets) if data.test_texts else None
        work = SiteWork(data, dataset(cfg, data.train_texts, data.train_labels, data.train_targets), test)
        _SITES.put(key, work, work.nbytes)
    return work


def round_seed(seed: int, site: int, server_round: int) -> int:
    return int(np.random.SeedSequence([seed, site, server_round, 17]).generate_state(1)[0] % (2**31))


def site_train(
    cfg: RunConfig, *, site: int, num_sites: int, server_round: int,
    global_state: Mapping[str, torch.Tensor], privacy_json: str | None, data_path: str | None = None,
    rank: int | None = None, before_step: Callable[[int], None] | None = None,
    canaries: TrainingCanaries | None = None, state_dir: Path | None = None,
    seal: Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], str | None]:
    """Train from the global adapter (with a rank rule: from this site's projection of it, at its
    rank); return (delta = local - start as ``delta-format`` sends it, metrics, new privacy JSON).
    ``state_dir``: the site's folder (its error-feedback residual lives there). ``seal``: secure
    aggregation (``fedpeft.secagg.site.seal``): the delta, weighted by the example count, leaves
    masked, and the metrics that would describe it (examples, loss, local accuracy) stay here."""
    work = site_work(cfg, site=site, num_sites=num_sites, data_path=data_path)
    device = models.select_device()
    ds = work.train
    start: Mapping[str, torch.Tensor] = global_state
    if cfg.rank_rule is not None:
        rank = ranks.site_rank(cfg, site, rank)
        start = ranks.start_state(cfg, global_state, rank)
        fold = ranks.folded_update(global_state) if cfg.rank_rule == "stack" else None
        model = worker_model(cfg, start, ranks.site_adapter(cfg, rank), fold=fold)
    else:
        model = worker_model(cfg, global_state)
    state = privacy_plan(cfg, len(ds), privacy_json) if cfg.privacy.enabled else None
    anchor = None
    if cfg.train.proximal_mu > 0:
        named = dict(model.named_parameters())
        anchor = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    seed = round_seed(cfg.train.seed, site, server_round)
    # Secret by default: DP noise and sampling seeded from this machine's entropy (training.train_local).
    noise_seed = seed if cfg.privacy.noise == "seeded" else None
    before_release = None
    if canaries is not None and state is not None:  # audit canaries join the real batches
        gen = torch.Generator().manual_seed(noise_seed ^ 0xC4 if noise_seed is not None else secrets.randbits(63))
        before_release = canaries.hook(dict(model.named_parameters()), state.sample_rate, state.max_grad_norm, gen)
    res = training.train_local(model, ds, train=cfg.train, privacy=cfg.privacy, privacy_state=state,
                               device=device, seed=seed, noise_seed=noise_seed, anchor=anchor,
                               precision=cfg.model.precision, before_step=before_step,
                               before_release=before_release, task=task_of(cfg.model))
    local = adapters.get_adapter_state(model)
    delta = {k: local[k] - start[k].to(local[k].dtype) for k in ranks.sent_keys(cfg, local)}
    if canaries is not None:
        canaries.score(delta)
    if site in attackers(cfg):  # fault injection: a poisoned site (simulations only)
        delta = attacked(cfg, site, server_round, delta)
    # quantised after the noise (post-processing); the ledger signs these bytes, the ones sent
    delta = compression.site_encode(delta, fmt=cfg.federation.delta_format, feedback=cfg.federation.error_feedback,
                                    folder=state_dir, server_round=server_round)
    if seal is not None:
        # frozen_a sums local adapters, not deltas: s_r * B at the global rank, and the head as trained
        delta = seal(ranks.frozen_a_part(cfg, local, global_state, rank) if cfg.rank_rule == "frozen_a" else delta,
                     float(len(ds)))
    local_acc = float("nan")
    # the locally trained adapter on this site's own held-out notes (a generative task's answers cost a
    # generation per prompt: its sites score the global adapter only, in the evaluate round)
    if work.test is not None and cfg.model.task == "classification" and seal is None:
        local_acc = training.evaluate(model, work.test, device=device, num_labels=len(cfg.data.label_list),
                                      precision=cfg.model.precision).accuracy
    metrics = {
        "site": float(site), "num-examples": float(len(ds)), "train-loss": res.loss, "steps": float(res.steps),
        "pass-seconds": res.pass_seconds,
        "local-accuracy": local_acc,
        "epsilon": res.epsilon, "bytes-up": float(compression.wire_bytes(delta)),
        "noise-multiplier": state.noise_multiplier if state else 0.0,
        "bfloat16": float(models.resolve_precision(cfg.model.precision, device) == "bfloat16"),
        "lora-rank": float(rank if rank is not None else cfg.adapter.rank),
        "server-round": float(server_round), "dp": float(cfg.privacy.enabled),
    }
    if seal is not None:  # the coordinator learns the sum only; these would describe this site's update
        for k in ("num-examples", "train-loss", "local-accuracy", "pass-seconds"):
            metrics.pop(k)
    return delta, metrics, (res.privacy_state.to_json() if res.privacy_state else None)


def privacy_plan(cfg: RunConfig, num_examples: int, privacy_json: str | None) -> PrivacyState:
    """The site's saved privacy state, or, on first participation, sigma calibrated for its plan."""
    if privacy_json:
        return PrivacyState.from_json(privacy_json)
    return training.plan_privacy(num_examples=num_examples, train=cfg.train, privacy=cfg.privacy,
                                 num_rounds=cfg.federation.num_rounds)


NO_DP_REASON = "trained WITHOUT differential privacy: this site's own policy (dp = false in its file)"


def site_round(
    cfg: RunConfig, *, site: int, num_sites: int, server_round: int, global_state: Mapping[str, torch.Tensor],
    vault: SiteVault | None, data_path: str | None = None, deployed: bool = False, rank: int | None = None,
    attempt: int = 0, seal: Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]] | None = None,
) -> Reply:
    """One train request: check the budget, train, save the privacy state, sign the ledger entry.

    The privacy state and the ledger live in ``vault`` (the site's own folder), one request at a
    time (``SiteVault.exclusive``); without DP there is nothing to account and no ledger."""
    if not deployed and is_late(cfg, site, server_round):  # fault injection: answer late
        time.sleep(cfg.federation.fault_late_seconds)
    if not cfg.privacy.enabled or vault is None:
        folder = vault.folder if vault is not None else site_folder(None, out_dir=cfg.federation.out_dir, site=site,
                                                                     deployed=deployed)
        delta, metrics, _ = site_train(cfg, site=site, num_sites=num_sites, server_round=server_round,
                                       global_state=global_state, privacy_json=None, data_path=data_path, rank=rank,
                                       state_dir=folder)
        if vault is None:
            return Reply("trained", delta, metrics)
        with vault.exclusive():  # a deployed site whose own file turned DP off: its ledger says so
            vault.record_release_without_dp(server_round=server_round, delta=delta,
                                            extra=getattr(seal, "ledger_fields", None))
            return Reply("trained", delta, metrics, NO_DP_REASON, vault.ledger_bytes(), vault.public_key())
    with vault.exclusive():
        return _private_round(cfg, site=site, num_sites=num_sites, server_round=server_round,
                              global_state=global_state, vault=vault, data_path=data_path, deployed=deployed,
                              rank=rank, attempt=attempt, seal=seal)


def _private_round(
    cfg: RunConfig, *, site: int, num_sites: int, server_round: int, global_state: Mapping[str, torch.Tensor],
    vault: SiteVault, data_path: str | None, deployed: bool, rank: int | None, attempt: int,
    seal: Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]] | None = None,
) -> Reply:
    """``site_round`` under DP, holding the site's vault."""
    gsha = delta_hash(global_state)
    # A secure round is never resent: the saved vector carries the masks of keys this retry replaced,
    # so the site trains again and its ledger records those steps too (honest, at a budget's cost).
    replay = None if seal is not None else vault.load_release(server_round=server_round, global_sha256=gsha)
    if replay is not None:  # a retried round (a server resumed after a crash): resend, do not retrain
        log.info("site %d round %d: resending the release already made for this global adapter", site, server_round)
        return Reply("trained", replay[0], replay[1], "", vault.ledger_bytes(), vault.public_key())
    seeded = cfg.privacy.noise == "seeded"
    if seeded and vault.privacy_json() is not None:  # a cut-short seeded round will redo the same steps
        vault.rollback_seeded_retry(server_round=server_round, global_sha256=gsha)
    vault.reconcile(noise=cfg.privacy.noise, deployed=deployed)  # steps an earlier crash spent without a ledger entry get one now
    prev = vault.privacy_json()
    crash = not deployed and attempt == 0 and crashes(cfg, site, server_round)  # injected on first tries
    hang = not crash and not deployed and attempt == 0 and hangs(cfg, site, server_round)
    injected = crash or hang

    def fault(when: str) -> None:
        if hang:  # silent past the server's round-timeout, then gone (a watchdog killed it)
            time.sleep(cfg.federation.fault_hang_seconds)
            raise InjectedFault(f"site {site}: injected hang in round {server_round} {when}, "
                                f"silent for {cfg.federation.fault_hang_seconds:g} s")
        raise InjectedFault(f"site {site}: injected crash in round {server_round} {when}")

    work = site_work(cfg, site=site, num_sites=num_sites, data_path=data_path)
    start_state = privacy_plan(cfg, len(work.train), prev)
    vault.begin_round(server_round=server_round, global_sha256=gsha, before=start_state.to_json(), seeded=seeded)

    def before_step(k: int) -> None:
        """Write-ahead: step k is on disk before its noise is drawn (a crash after counts it)."""
        if injected and k == 2:
            fault("after 1 DP step")
        vault.save_privacy(start_state.with_steps(k, server_round).to_json())

    canaries = None
    if cfg.privacy.audit_canaries and not deployed:
        canaries = vault.load_canaries() or TrainingCanaries.create(
            {k: tuple(v.shape) for k, v in global_state.items()}, cfg.privacy.audit_canaries,
            round_seed(cfg.train.seed, site, 0) if cfg.privacy.noise == "seeded" else secrets.randbits(63))
    try:
        delta, metrics, new_json = site_train(cfg, site=site, num_sites=num_sites, server_round=server_round,
                                              global_state=global_state, privacy_json=prev, data_path=data_path,
                                              rank=rank, before_step=before_step, canaries=canaries,
                                              state_dir=vault.folder, seal=seal)
        if injected:  # a one-step round: fail after it, before the reply leaves
            fault("after its DP steps")
    except BudgetExceeded as e:
        state = start_state
        vault.record_decline(server_round=server_round, state=state, reason=str(e))
        vault.end_round()
        log.info("site %d round %d: declined: %s", site, server_round, e)
        return Reply("declined", None, {"site": float(site), "epsilon": state.epsilon()}, str(e),
                          vault.ledger_bytes(), vault.public_key())
    assert new_json is not None
    after = dataclasses.replace(PrivacyState.from_json(new_json), round=server_round)
    vault.save_privacy(after.to_json())  # the steps are spent: state first, then the signed record of them
    vault.record_release(server_round=server_round, before=PrivacyState.from_json(prev) if prev else None,
                         after=after, delta=delta, noise=cfg.privacy.noise, deployed=deployed,
                         extra=getattr(seal, "ledger_fields", None))
    vault.save_release(server_round=server_round, global_sha256=gsha, delta=delta, metrics=metrics)
    vault.end_round()
    if canaries is not None:
        vault.save_canaries(canaries)
    return Reply("trained", delta, metrics, "", vault.ledger_bytes(), vault.public_key())


def settle_ledger(cfg: RunConfig, vault: SiteVault, *, deployed: bool) -> Reply | None:
    """After a crash: sign the steps the privacy state counts but the ledger does not; return a
    status carrying the ledger for the server's copy (None when there was nothing to settle)."""
    with vault.exclusive():
        if vault.privacy_json() is None or vault.reconcile(noise=cfg.privacy.noise, deployed=deployed) is None:
            return None
        return Reply("evaluated", None, {"site": float(vault.site)}, "", vault.ledger_bytes(), vault.public_key())


def site_evaluate(
    cfg: RunConfig, *, site: int, num_sites: int, global_state: Mapping[str, torch.Tensor],
    data_path: str | None = None,
) -> dict[str, float]:
    """Score the global adapter on this site's own held-out notes."""
    key = _work_key(cfg, site, num_sites, data_path)
    work = _work_at(key, cfg, site, num_sites, data_path)
    ds = work.test if work.test is not None else work.train
    model = worker_model(dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False)),
                         global_state, global_adapter_config(cfg, global_state))
    ev = evaluate(cfg, model, ds)
    _SITES.put(key, work, work.nbytes)  # what evaluation kept counts too
    out = {"site": float(site), "num-examples": ev.pop("examples"), **ev}
    if "macro-f1" in out:  # classification's metrics keep their order
        out = {k: out[k] for k in ("site", "num-examples", "accuracy", "loss", "macro-f1")}
    return out
