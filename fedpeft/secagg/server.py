"""The coordinator's side of secure aggregation on Flower's Message API: stages 1-2 before the
train messages go out, stage 4 after the masked replies come back. It relays keys and encrypted
shares, and learns only the sum (``protocol`` says why). Sites that drop at any stage are left
out of the next; below the threshold the round is skipped, never merged.

Written against ``Grid.send_and_receive`` because Flower's ``SecAggPlusWorkflow`` needs its legacy
``LegacyContext`` and cannot run under a Message-API strategy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedpeft.records import SECAGG
from fedpeft.secagg import protocol as sa
from fedpeft.secagg import span, wire
from fedpeft.secagg.site import MASKED

log = logging.getLogger(__name__)



@dataclass
class SecureRound:
    """One round's relayed state: which node plays which site, the adverts, the share inboxes."""

    server_round: int
    threshold: int = 0
    node_of: dict[int, int] = field(default_factory=dict)  # site -> node
    adverts: dict[int, str] = field(default_factory=dict)  # site -> its advert (JSON), as relayed
    inbox: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> ciphertext
    dropped: dict[str, list[int]] = field(default_factory=dict)  # stage -> sites (or nodes) gone there
    run_config: ConfigRecord = field(default_factory=ConfigRecord)  # what every stage's message carries
    stage_bytes_up: int = 0  # bytes the sites sent in stages 1, 2 and 4 (adverts, shares, reveals)

    @property
    def participants(self) -> list[int]:
        return sorted(self.inbox)


def _ask(grid: Grid, nodes: Iterable[int], action: str, run_config: ConfigRecord, payload: Mapping[int, Mapping],
         timeout: float | None, rnd: SecureRound | None = None) -> dict[int, dict]:
    """Send ``query.<action>`` to ``nodes`` (each its own payload); node -> its reply's SECAGG record."""
    msgs = [Message(RecordDict({"config": run_config, SECAGG: ConfigRecord(dict(payload[n]))}),
                    dst_node_id=n, message_type=f"query.{action}") for n in nodes]
    out: dict[int, dict] = {}
    # the stages are short messages: poll for their replies every 10 ms, not Flower's 0.1 s (in-memory grid)
    interval = getattr(grid, "pull_interval", None)
    if isinstance(interval, float):
        grid.pull_interval = min(interval, 0.01)  # type: ignore[attr-defined]
    try:
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
    finally:
        if isinstance(interval, float):
            grid.pull_interval = interval  # type: ignore[attr-defined]
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() or SECAGG not in reply.content.config_records:
            reason = reply.error.reason if reply.has_error() else "no secagg record"
            log.warning("secagg %s: node %d dropped (%s)", action, node, reason)
            continue
        out[node] = dict(reply.content.config_records[SECAGG])
        if rnd is not None:
            rnd.stage_bytes_up += wire.record_bytes(out[node])
    return out


def setup(grid: Grid, nodes: list[int], *, server_round: int, run_config: ConfigRecord, fraction: float,
          min_sites: int, timeout: float | None = None) -> SecureRound:
    """Stages 1-2: collect signed adverts, relay them, collect the encrypted shares."""
    rnd = SecureRound(server_round, run_config=run_config)
    base = {"server-round": server_round}
    got = _ask(grid, nodes, "secagg_keys", run_config, {n: base for n in nodes}, timeout, rnd)
    for node, rec in got.items():
        try:
            ad = sa.KeyAdvert.from_json(str(rec["advert"]))
        except (KeyError, sa.SecAggError) as e:
            log.warning("secagg keys: node %d sent a malformed advert (%s)", node, e)
            continue
        if ad.site in rnd.node_of:
            log.warning("secagg keys: site %d advertised twice; node %d ignored", ad.site, node)
            continue
        rnd.node_of[ad.site], rnd.adverts[ad.site] = node, str(rec["advert"])
    rnd.dropped["keys"] = sorted(set(nodes) - set(rnd.node_of.values()))
    rnd.threshold = sa.threshold_for(len(rnd.adverts), fraction, min_sites)
    if len(rnd.adverts) < rnd.threshold:
        return rnd
    relay = {**base, "adverts": json.dumps(sorted(rnd.adverts.values())), "threshold": rnd.threshold}
    got = _ask(grid, list(rnd.node_of.values()), "secagg_shares", run_config,
               {n: relay for n in rnd.node_of.values()}, timeout, rnd)
    site_of = {n: s for s, n in rnd.node_of.items()}
    for node, rec in got.items():
        try:
            shares = wire.read_shares(rec)
        except ValueError as e:
            log.warning("secagg shares: node %d sent malformed shares (%s)", node, e)
            continue
        i = site_of[node]
        for j, ct in shares.items():
            rnd.inbox.setdefault(j, {})[i] = ct
        rnd.inbox.setdefault(i, {})
    senders = {i for box in rnd.inbox.values() for i in box}
    rnd.inbox = {j: {i: c for i, c in box.items() if i in senders} for j, box in rnd.inbox.items() if j in senders}
    rnd.dropped["shares"] = sorted(set(rnd.adverts) - senders)
    return rnd


def masked_vector(arrays: Mapping[str, torch.Tensor], size: int) -> np.ndarray:
    """A secure train reply's one tensor, checked: ``size`` int64 ring elements (the layout's, or 2
    for a range vector)."""
    if set(arrays) != {MASKED}:
        raise ValueError(f"arrays: a secure reply carries only {MASKED!r}, got {sorted(arrays)[:3]}")
    t = arrays[MASKED]
    if t.dtype != torch.int64 or t.dim() != 1 or t.numel() != size:
        raise ValueError(f"{MASKED}: int64 vector of {size} expected, got {t.dtype} {tuple(t.shape)}")
    return t.numpy().view(np.uint64)


def collect_vectors(grid: Grid, rnd: SecureRound, sites: list[int], bits: span.Bits, size: int, *,
                    timeout: float | None = None) -> dict[int, tuple[np.ndarray, bytes, bytes]]:
    """Stage 3b: ask the sites that sent a range vector for their masked update at ``bits``; site ->
    (uint64 ring elements, the bytes as sent, the ledger line binding them). A malformed reply drops
    that site."""
    payload = {rnd.node_of[s]: {"server-round": rnd.server_round, "ring-bits": bits.ring_bits,
                                "frac-bits": bits.frac_bits, "weight-frac-bits": bits.weight_frac_bits} for s in sites}
    got = _ask(grid, list(payload), "secagg_vector", rnd.run_config, payload, timeout, rnd)
    site_of = {n: s for s, n in rnd.node_of.items()}
    out = {}
    for node, rec in got.items():
        raw, line = rec.get("masked"), rec.get("ledger-entry")
        try:
            if not isinstance(raw, bytes) or not isinstance(line, bytes):
                raise ValueError(f"masked/ledger-entry: bytes expected, got {type(raw).__name__}/{type(line).__name__}")
            out[site_of[node]] = (span.widen(raw, size, bits), raw, line)
        except ValueError as e:
            log.warning("secagg vector: node %d sent a malformed vector (%s)", node, e)
    rnd.dropped["vector"] = sorted(set(sites) - set(out))
    return out


def unmask_round(grid: Grid, rnd: SecureRound, masked: Mapping[int, np.ndarray], *,
                 timeout: float | None = None) -> tuple[np.ndarray, dict[int, bytes], dict[int, bytes]]:
    """Stage 4: ask the survivors for their shares, unmask; return the sum (ring elements) and the
    reconstruction (survivors' self-mask seeds, dropped sites' mask keys) the audit replays.
    Raises ``SecAggError`` when fewer than the threshold survive or reveal."""
    survivors = sorted(masked)
    dropped = sorted(set(rnd.participants) - set(survivors))
    rnd.dropped["masked"] = dropped
    if len(survivors) < rnd.threshold:
        raise sa.SecAggError(f"round {rnd.server_round}: {len(survivors)} masked vectors, below the threshold of "
                             f"{rnd.threshold}: the round is skipped")
    payload = {rnd.node_of[s]: {"server-round": rnd.server_round, "survivors": json.dumps(survivors),
                                "dropped": json.dumps(dropped), **wire.shares_record(rnd.inbox.get(s, {}), prefix="inbox")}
               for s in survivors}
    got = _ask(grid, list(payload), "secagg_reveal", rnd.run_config, payload, timeout, rnd)
    site_of = {n: s for s, n in rnd.node_of.items()}
    reveals: dict[int, dict[int, tuple[str, bytes]]] = {}
    for node, rec in got.items():
        try:
            reveals[site_of[node]] = wire.read_reveal(rec)
        except (KeyError, ValueError) as e:
            log.warning("secagg reveal: node %d sent malformed shares (%s)", node, e)
    rnd.dropped["reveal"] = sorted(set(survivors) - set(reveals))
    adverts = {s: sa.KeyAdvert.from_json(a) for s, a in rnd.adverts.items()}
    seeds, keys = sa.reconstruct(reveals, survivors=survivors, dropped=dropped, threshold=rnd.threshold,
                                 server_round=rnd.server_round)
    total = sa.unmask_with(masked, adverts, seeds, keys, server_round=rnd.server_round)
    return total, seeds, keys
