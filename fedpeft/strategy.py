"""Flower strategies over adapter deltas.

``DeltaMerge`` replaces FedAvg's aggregation step: it validates every reply in one place
(``federation.validate_train_reply``), drops malformed ones (the round goes on), merges the deltas
with a registered pure rule and returns ``global + merged delta``. Mixed in *below* Flower's own
strategies (FedProx, FedAdam, FedYogi, FedAdagrad), their server logic runs on top unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

from fedpeft import ranks
from fedpeft.adapters import state_bytes
from fedpeft.aggregation import create_merge
from fedpeft.aggregation.hetero import rank_merges
from fedpeft.config import RunConfig
from fedpeft.federation import (
    CONFIG, METRICS, STATUS, ReplyError, ReplyLimits, from_arrays, to_arrays, validate_train_reply,
)
from fedpeft.privacy.client_dp import ClientBudgetExhausted, ClientLevelDP
from fedpeft.privacy.ledger import LedgerError, ServerCopies, delta_hash
from fedpeft.update_bounds import update_bound

log = logging.getLogger(__name__)


@dataclass
class RoundLog:
    """What the server saw in one round (per-site metrics keyed by site id)."""

    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"node", "site", "round", "reason"} per rejected reply
    declined: dict[int, str] = field(default_factory=dict)  # site -> why (its budget)
    merged: dict[int, str] = field(default_factory=dict)  # site -> SHA-256 of the delta merged
    sent: int = 0  # train requests sent this round
    sent_nodes: list[int] = field(default_factory=list)
    client_epsilon: float | None = None  # client-level epsilon after this round (client-dp)
    retries: int = 0  # times the round asked missing sites again
    ranks: dict[int, int] = field(default_factory=dict)  # site -> LoRA rank it trained (rank rules)
    dropped_energy: float | None = None  # svd: largest share of a module's update cut by truncation
    dropped_by_module: dict[str, float] = field(default_factory=dict)  # svd: that share, per LoRA module
    bytes_down: int = 0
    skipped: bool = False


class DeltaMerge(FedAvg):
    """FedAvg's plumbing with adapter-delta validation and a pluggable merge rule."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: dict[int, RoundLog] = {}
        self._global: dict[str, torch.Tensor] | None = None
        self.ledgers: ServerCopies | None = None  # DP runs: every release must match a signed entry
        self.client_dp: ClientLevelDP | None = None  # client-level DP: clip + noise after validation
        self.rank_cfg: RunConfig | None = None  # a heterogeneous-rank rule: merge whole adapters by rank
        self.limits = ReplyLimits()
        self._starts: dict[int, dict[str, torch.Tensor]] = {}  # rank rules: each rank's start this round
        self._grid: Grid | None = None
        self._sent: dict[int, Message] = {}
        self.round_retries = 0  # re-ask sites without a good reply this many times before skipping a round
        self.retry_timeout: float | None = None
        self.round_offset = 0  # a resumed run: Flower counts rounds from 1 again; sites and logs must not
        self.update_bound = None  # DP runs: (reply) -> largest honest |update| in a coordinate (update_bounds)
        self.set_merge("fedavg", min_valid_replies=1)

    def set_merge(self, name: str, *, min_valid_replies: int) -> None:
        """Choose the merge rule (registry name) and the fewest valid replies that make a round."""
        self.merge_name = name
        # rank rules merge whole adapters by rank (``_merge_ranks``), not same-shaped deltas
        self.merge_fn = None if name in rank_merges() else create_merge(name)
        self.min_valid_replies = min_valid_replies

    def _log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        server_round += self.round_offset
        self._global = from_arrays(arrays)
        self._starts = {}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._log(server_round).bytes_down = len(messages) * state_bytes(self._global)
        self._log(server_round).sent = len(messages)
        self._log(server_round).sent_nodes = [m.metadata.dst_node_id for m in messages]
        self._grid = grid
        self._sent = {m.metadata.dst_node_id: m for m in messages}
        return messages

    def _resend(self, node: int, attempt: int) -> Message:
        """The round's train request again, marked with its attempt (the site knows it is a retry)."""
        msg = self._sent[node]
        content = RecordDict({k: v for k, v in msg.content.items()})
        content[CONFIG] = ConfigRecord({**dict(msg.content[CONFIG]), "attempt": attempt})
        return Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply on its own, merge the valid deltas, return global + merged delta."""
        assert self._global is not None, "configure_train must run before aggregate_train"
        server_round += self.round_offset
        replies = list(replies)
        rlog = self._log(server_round)
        valid = []
        seen: set[int] = set()
        limits = dataclasses.replace(self.limits, server_round=server_round, max_update=self.update_bound)

        def reject(node: int, site: int | None, reason: str) -> None:
            reason = reason if len(reason) < 600 else reason[:300] + " … " + reason[-300:]
            rlog.rejected.append(f"node {node}: {reason}")
            rlog.failures.append({"node": node, "site": site, "round": server_round, "reason": reason})
            log.warning("round %d: rejected reply from node %d: %s", server_round, node, reason)

        def collect(batch: list, asked: list[int]) -> set[int]:
            """Validate a batch of replies into ``valid``; return the nodes whose reply was good."""
            good: set[int] = set()
            for msg in batch:
                node = msg.metadata.src_node_id
                if msg.has_error():
                    reject(node, None, str(msg.error.reason))
                    continue
                try:
                    reply = validate_train_reply(msg.content, expected=self._global, ledgers=self.ledgers,
                                                 server_round=server_round, expected_for=self._expected_for(),
                                                 limits=limits)
                except ReplyError as e:
                    site = dict(msg.content.metric_records.get(METRICS, {})).get("site") if msg.content else None
                    reject(node, int(site) if isinstance(site, (int, float)) else None, str(e))
                    continue
                if reply.site in seen:
                    reject(node, reply.site, f"site {reply.site}: a second reply in round {server_round}")
                    continue
                seen.add(reply.site)
                good.add(node)
                if reply.delta is None:
                    rlog.declined[reply.site] = reply.reason
                    log.info("round %d: site %d declined: %s", server_round, reply.site, reply.reason)
                    continue
                valid.append(reply)
            answered = {getattr(getattr(r, "metadata", None), "src_node_id", None) for r in batch}
            for node in asked:  # asked, but nothing came back before the round's timeout
                if node not in answered:
                    reject(node, None, "no reply within the round's timeout (round-timeout)")
            return good

        done = collect(replies, rlog.sent_nodes)
        for attempt in range(1, self.round_retries + 1):  # too few good replies: ask the others again
            missing = [n for n in rlog.sent_nodes if n not in done]
            if len(valid) >= self.min_valid_replies or not missing or self._grid is None:
                break
            log.warning("round %d: %d valid replies < min-train-sites=%d; asking %d sites again (attempt %d)",
                        server_round, len(valid), self.min_valid_replies, len(missing), attempt + 1)
            rlog.retries += 1
            again = [self._resend(n, attempt) for n in missing if n in self._sent]
            done |= collect(list(self._grid.send_and_receive(again, timeout=self.retry_timeout)), missing)
        if len(valid) < self.min_valid_replies:
            log.warning("round %d: %d valid replies < min-train-sites=%d; global adapter unchanged",
                        server_round, len(valid), self.min_valid_replies)
            rlog.skipped = True
            return None, None
        valid.sort(key=lambda r: r.site)  # fixed order: bitwise-repeatable merges
        deltas = [r.delta for r in valid if r.delta is not None]
        if self.rank_cfg is not None:
            new_global = self._merge_ranks(valid, rlog)
            for r in valid:
                rlog.train[r.site] = r.metrics
                rlog.merged[r.site] = delta_hash(r.delta)
            total = sum(r.num_examples for r in valid)
            return to_arrays(new_global), MetricRecord({
                "train-loss": sum(r.metrics.get("train-loss", 0.0) * r.num_examples for r in valid) / total,
                "num-examples": total, "sites": len(valid)})
        if self.client_dp is not None:
            try:
                merged = self.client_dp.release(server_round, deltas, num_sampled=max(rlog.sent, len(deltas)))
            except ClientBudgetExhausted as e:
                log.warning("round %d: %s", server_round, e)
                rlog.skipped = True
                return None, None
            rlog.client_epsilon = self.client_dp.accountant.get_epsilon(self.client_dp.delta)
        else:
            assert self.merge_fn is not None, f"merge={self.merge_name!r} needs rank_cfg"
            merged = self.merge_fn(deltas, [float(r.num_examples) for r in valid])
        new_global = {k: self._global[k] + merged[k].to(self._global[k].dtype) for k in self._global}
        for r in valid:
            rlog.train[r.site] = r.metrics
            rlog.merged[r.site] = delta_hash(r.delta)
        total = sum(r.num_examples for r in valid)
        metrics = MetricRecord({
            "train-loss": sum(r.metrics.get("train-loss", 0.0) * r.num_examples for r in valid) / total,
            "num-examples": total, "sites": len(valid),
        })
        return to_arrays(new_global), metrics

    def _sync_ledger(self, msg: Message, metrics: dict, rlog: RoundLog, server_round: int) -> None:
        """An evaluate reply may carry a ledger with recovery entries (steps a crashed round spent)."""
        rec = msg.content.config_records.get(STATUS) if self.ledgers is not None else None
        if rec is None or "ledger" not in rec or "site" not in metrics:
            return
        try:
            self.ledgers.sync(site=int(metrics["site"]), data=str(rec["ledger"]).encode(),
                              public_key=str(rec.get("public-key", "")))
        except LedgerError as e:
            rlog.failures.append({"node": msg.metadata.src_node_id, "site": int(metrics["site"]),
                                  "round": server_round, "reason": f"ledger: {e}"})

    def _expected_for(self):
        """With a rank rule: the tensors a site of a given rank must send (its start's shapes)."""
        cfg, glob = self.rank_cfg, self._global
        if cfg is None or glob is None:
            return None

        def expected(rank: int) -> dict[str, torch.Tensor]:
            start = self._start(ranks.site_rank(cfg, 0, rank))
            return {k: start[k] for k in ranks.sent_keys(cfg, start)}

        return expected

    def _start(self, rank: int) -> dict[str, torch.Tensor]:
        """A rank's starting adapter this round (what its sites trained from), computed once."""
        if rank not in self._starts:
            assert self.rank_cfg is not None and self._global is not None
            self._starts[rank] = ranks.start_state(self.rank_cfg, self._global, rank)
        return self._starts[rank]

    def _merge_ranks(self, valid: list, rlog: RoundLog) -> dict[str, torch.Tensor]:
        """Rebuild each site's local adapter (its start + its delta) and merge them by rank."""
        cfg, glob = self.rank_cfg, self._global
        assert cfg is not None and glob is not None
        locals_ = []
        for r in valid:
            rank = int(r.metrics["lora-rank"])
            start = self._start(rank)
            locals_.append(({k: v + r.delta[k].to(v.dtype) if k in r.delta else v for k, v in start.items()},
                            rank, float(r.num_examples)))
            rlog.ranks[r.site] = rank
        new_global, dropped = ranks.merge_states(cfg, glob, locals_)
        rlog.dropped_energy = max(dropped.values(), default=0.0)
        rlog.dropped_by_module = dropped
        return new_global

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        rlog = self._log(server_round)
        ok = []
        for msg in replies:
            if msg.has_error():
                rlog.rejected.append(f"evaluate node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            m = dict(msg.content.metric_records.get(METRICS, {}))
            self._sync_ledger(msg, m, rlog, server_round)
            if "site" in m and "accuracy" in m:
                rlog.evaluate[int(m["site"])] = {k: float(v) for k, v in m.items()}
                ok.append(m)
        if not ok:
            return None
        n = sum(m["num-examples"] for m in ok)
        return MetricRecord({"accuracy": sum(m["accuracy"] * m["num-examples"] for m in ok) / n,
                             "loss": sum(m["loss"] * m["num-examples"] for m in ok) / n})


_FLOWER = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


def make_strategy(cfg: RunConfig) -> DeltaMerge:
    """Flower's named strategy with ``DeltaMerge`` doing the aggregation underneath it."""
    fed = cfg.federation
    base = _FLOWER[fed.strategy]
    common = dict(
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=min(fed.min_train_sites, fed.num_sites), min_evaluate_nodes=1 if fed.fraction_evaluate else 0,
        min_available_nodes=min(fed.num_sites, max(fed.min_train_sites, 1)),
    )
    extra: dict[str, object] = {}
    if base is FedProx:
        extra["proximal_mu"] = cfg.train.proximal_mu
    if base in (FedAdam, FedYogi, FedAdagrad):
        extra["eta"] = fed.server_lr
        extra["eta_l"] = cfg.train.lr
    if base is FedAvg:
        cls = DeltaMerge
    else:
        cls = type(f"{base.__name__}OverDeltas", (base, DeltaMerge), {})

    strategy = cls(**common, **extra)
    strategy.set_merge(fed.merge, min_valid_replies=fed.min_train_sites)
    if cfg.privacy.enabled:
        strategy.ledgers = ServerCopies(Path(fed.out_dir) / "ledger")
    if cfg.rank_rule is not None:
        strategy.rank_cfg = cfg
    strategy.round_retries = fed.round_retries
    strategy.retry_timeout = fed.round_timeout or None
    strategy.limits = ReplyLimits(max_bytes=int(fed.max_reply_mib * 2**20), max_examples=fed.max_num_examples)
    strategy.update_bound = update_bound(cfg)
    p = cfg.privacy
    if p.client_dp:
        if fed.merge != "fedavg":
            raise ValueError(f"merge={fed.merge!r}: client-dp=true needs merge='fedavg' (an unweighted sum of "
                             "clipped deltas); heterogeneous-rank rules are not covered yet")
        strategy.client_dp = ClientLevelDP(out_dir=fed.out_dir, noise_multiplier=p.client_noise_multiplier,
                                           clip=p.client_clip, delta=p.target_delta, population=fed.num_sites,
                                           max_epsilon=p.client_max_epsilon)
    return strategy
