"""Flower strategies over adapter deltas.

``DeltaMerge`` replaces FedAvg's aggregation step: it validates every reply in one place
(``federation.validate_train_reply``), drops malformed ones (the round goes on), merges the deltas
with a registered pure rule and returns ``global + merged delta``. Mixed in *below* Flower's own
strategies (FedProx, FedAdam, FedYogi, FedAdagrad), their server logic runs on top unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

from fedpeft import ranks
from fedpeft.adapters import state_bytes
from fedpeft.aggregation import MergeFn, create_merge
from fedpeft.aggregation.hetero import rank_merges
from fedpeft.config import RunConfig
from fedpeft.federation import (
    CONFIG,
    METRICS,
    STATUS,
    ReplyError,
    ReplyLimits,
    from_arrays,
    to_arrays,
    validate_train_reply,
)
from fedpeft.merging import add_delta, merge_replies
from fedpeft.privacy.client_dp import ClientBudgetExhausted, ClientLevelDP
from fedpeft.privacy.ledger import LedgerError, ServerCopies, delta_hash
from fedpeft.reply import Reply
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


@dataclass
class MergePolicy:
    """How ``DeltaMerge`` validates and merges, passed whole to its ``__init__`` (as Flower's DP
    wrappers take the strategy they wrap); ``from_config`` builds it from a run config."""

    merge: str = "fedavg"  # a registered merge rule, or a rank rule (then rank_cfg is set)
    min_valid_replies: int = 1  # fewer valid replies than this: the round is skipped, never merged
    rank_cfg: RunConfig | None = None  # a heterogeneous-rank rule: merge whole adapters by rank
    ledgers: ServerCopies | None = None  # DP runs: every release must match a signed entry
    client_dp: ClientLevelDP | None = None  # client-level DP: clip + noise after validation
    limits: ReplyLimits = field(default_factory=ReplyLimits)
    update_bound: Callable[[Reply], float] | None = None  # DP runs: largest honest |update| (update_bounds)
    round_retries: int = 0  # re-ask sites without a good reply this many times before skipping a round
    retry_timeout: float | None = None
    delta_format: str = "float32"  # how sites send deltas (fedpeft.compression); decoded at validation
    secure_fraction: float | None = None  # secure aggregation on: the threshold's fraction (fedpeft.secagg)
    out_dir: str | None = None  # where secure rounds keep the masked vectors (evidence for the audit)
    ddp: Any = None  # secure aggregation with client-dp: the distributed-DP plan (fedpeft.secagg.ddp.DdpPlan)
    last_round: int = 0  # the federation's last round, whose merged adapter ``finish`` post-processes
    finish: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # set by the ServerApp

    def __post_init__(self) -> None:
        # rank rules merge whole adapters by rank (``merging.merge_replies``), not same-shaped deltas
        self.merge_fn: MergeFn | None = None if self.merge in rank_merges() else create_merge(self.merge)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> MergePolicy:
        fed, p = cfg.federation, cfg.privacy
        client_dp = None
        if p.client_dp and fed.secure_aggregation:  # distributed: the sites add the noise (fedpeft.secagg.ddp)
            pass
        elif p.client_dp:
            if fed.merge != "fedavg":
                raise ValueError(f"merge={fed.merge!r}: client-dp=true needs merge='fedavg' (an unweighted sum of "
                                 "clipped deltas); heterogeneous-rank rules are not covered yet")
            client_dp = ClientLevelDP(out_dir=fed.out_dir, noise_multiplier=p.client_noise_multiplier,
                                      clip=p.client_clip, delta=p.target_delta, population=fed.num_sites,
                                      max_epsilon=p.client_max_epsilon)
        return cls(merge=fed.merge, min_valid_replies=fed.min_train_sites,
                   rank_cfg=cfg if cfg.rank_rule is not None else None,
                   ledgers=ServerCopies(Path(fed.out_dir) / "ledger") if p.enabled else None, client_dp=client_dp,
                   limits=ReplyLimits(max_bytes=int(fed.max_reply_mib * 2**20), max_examples=fed.max_num_examples),
                   update_bound=update_bound(cfg), round_retries=fed.round_retries,
                   retry_timeout=fed.round_timeout or None, delta_format=fed.delta_format,
                   secure_fraction=fed.secagg_threshold if fed.secure_aggregation else None, out_dir=fed.out_dir,
                   ddp=_ddp_plan(cfg), last_round=fed.num_rounds)


def _ddp_plan(cfg: RunConfig) -> Any:
    p = cfg.privacy
    if not (p.client_dp and cfg.federation.secure_aggregation):
        return None
    from fedpeft.secagg.ddp import DdpPlan

    return DdpPlan(noise_multiplier=p.client_noise_multiplier, clip=p.client_clip, delta=p.target_delta,
                   max_epsilon=p.client_max_epsilon)


class DeltaMerge(FedAvg):
    """FedAvg's plumbing with adapter-delta validation and a pluggable merge rule (``policy``)."""

    def __init__(self, *args: Any, policy: MergePolicy | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a combined class (``make_strategy``) sets the policy before Flower's own __init__ chain
        self.policy: MergePolicy = policy if policy is not None else getattr(self, "policy", MergePolicy())
        self.rounds: dict[int, RoundLog] = {}
        self._global: dict[str, torch.Tensor] | None = None
        self._starts: dict[int, dict[str, torch.Tensor]] = {}  # rank rules: each rank's start this round
        self._grid: Grid | None = None
        self._sent: dict[int, Message] = {}
        self.round_offset = 0  # a resumed run: Flower counts rounds from 1 again; sites and logs must not

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
        if self.policy.secure_fraction is not None:
            messages = self._secure.configure(self, server_round, messages, grid)
            self._log(server_round).sent = len(messages)
            self._log(server_round).sent_nodes = [m.metadata.dst_node_id for m in messages]
        self._sent = {m.metadata.dst_node_id: m for m in messages}
        return messages

    @property
    def _secure(self) -> Any:
        from fedpeft.secagg.strategy import SecureRounds  # only secure runs load the protocol

        if getattr(self, "_secure_rounds", None) is None:
            self._secure_rounds = SecureRounds()
        return self._secure_rounds

    def _resend(self, node: int, attempt: int) -> Message:
        """The round's train request again, marked with its attempt (the site knows it is a retry)."""
        msg = self._sent[node]
        content = RecordDict({k: v for k, v in msg.content.items()})
        content[CONFIG] = ConfigRecord({**dict(msg.content.config_records[CONFIG]), "attempt": attempt})
        return Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply on its own, merge the valid deltas, return global + merged delta."""
        assert self._global is not None, "configure_train must run before aggregate_train"
        server_round += self.round_offset
        replies = list(replies)
        rlog = self._log(server_round)
        if self.policy.secure_fraction is not None:
            return self._secure.aggregate(self, server_round, replies, rlog)
        valid = []
        seen: set[int] = set()
        limits = dataclasses.replace(self.policy.limits, server_round=server_round, max_update=self.policy.update_bound)

        def reject(node: int, site: int | None, reason: str) -> None:
            reason = reason if len(reason) < 600 else reason[:300] + " … " + reason[-300:]
            rlog.rejected.append(f"node {node}: {reason}")
            rlog.failures.append({"node": node, "site": site, "round": server_round, "reason": reason})
            log.warning("round %d: rejected reply from node %d: %s", server_round, node, reason)

        def collect(batch: list, asked: list[int]) -> set[int]:
            """Validate a batch of replies into ``valid``; return the nodes whose reply was good."""
            good: set[int] = set()
            assert self._global is not None
            for msg in batch:
                node = msg.metadata.src_node_id
                if msg.has_error():
                    reject(node, None, str(msg.error.reason))
                    continue
                try:
                    reply = validate_train_reply(msg.content, expected=self._global, ledgers=self.policy.ledgers,
                                                 server_round=server_round, expected_for=self._expected_for(),
                                                 limits=limits, delta_format=self.policy.delta_format)
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
        for attempt in range(1, self.policy.round_retries + 1):  # too few good replies: ask the others again
            missing = [n for n in rlog.sent_nodes if n not in done]
            if len(valid) >= self.policy.min_valid_replies or not missing or self._grid is None:
                break
            log.warning("round %d: %d valid replies < min-train-sites=%d; asking %d sites again (attempt %d)",
                        server_round, len(valid), self.policy.min_valid_replies, len(missing), attempt + 1)
            rlog.retries += 1
            again = [self._resend(n, attempt) for n in missing if n in self._sent]
            done |= collect(list(self._grid.send_and_receive(again, timeout=self.policy.retry_timeout)), missing)
        if len(valid) < self.policy.min_valid_replies:
            log.warning("round %d: %d valid replies < min-train-sites=%d; global adapter unchanged",
                        server_round, len(valid), self.policy.min_valid_replies)
            rlog.skipped = True
            return None, None
        valid.sort(key=lambda r: r.site)  # fixed order: bitwise-repeatable merges
        deltas = [r.delta for r in valid if r.delta is not None]
        if self.policy.client_dp is not None:
            try:
                merged = self.policy.client_dp.release(server_round, deltas, num_sampled=max(rlog.sent, len(deltas)))
            except ClientBudgetExhausted as e:
                log.warning("round %d: %s", server_round, e)
                rlog.skipped = True
                return None, None
            rlog.client_epsilon = self.policy.client_dp.accountant.get_epsilon(self.policy.client_dp.delta)
            new_global = add_delta(self._global, merged)
        else:
            new_global, info = merge_replies(self._global, valid, merge_fn=self.policy.merge_fn,
                                             rank_cfg=self.policy.rank_cfg, start=self._start)
            rlog.ranks = info.ranks
            if self.policy.rank_cfg is not None:
                rlog.dropped_energy = max(info.dropped_by_module.values(), default=0.0)
                rlog.dropped_by_module = info.dropped_by_module
        if self.policy.finish is not None and server_round == self.policy.last_round:
            new_global = self.policy.finish(new_global)  # public post-processing of the released adapter
        for r in valid:
            rlog.train[r.site] = r.metrics
            rlog.merged[r.site] = r.sent_sha256 or delta_hash(r.delta or {})  # what the site signed
        total = sum(r.num_examples for r in valid)
        metrics = MetricRecord({
            "train-loss": sum(r.metrics.get("train-loss", 0.0) * r.num_examples for r in valid) / total,
            "num-examples": total, "sites": len(valid),
        })
        return to_arrays(new_global), metrics

    def _sync_ledger(self, msg: Message, metrics: dict, rlog: RoundLog, server_round: int) -> None:
        """An evaluate reply may carry a ledger with recovery entries (steps a crashed round spent)."""
        ledgers = self.policy.ledgers
        rec = msg.content.config_records.get(STATUS) if ledgers is not None else None
        if ledgers is None or rec is None or "ledger" not in rec or "site" not in metrics:
            return
        try:
            ledgers.sync(site=int(metrics["site"]), data=str(rec["ledger"]).encode(),
                         public_key=str(rec.get("public-key", "")))
        except LedgerError as e:
            rlog.failures.append({"node": msg.metadata.src_node_id, "site": int(metrics["site"]),
                                  "round": server_round, "reason": f"ledger: {e}"})

    def _expected_for(self):
        """With a rank rule: the tensors a site of a given rank must send (its start's shapes)."""
        cfg, glob = self.policy.rank_cfg, self._global
        if cfg is None or glob is None:
            return None

        def expected(rank: int) -> dict[str, torch.Tensor]:
            start = self._start(ranks.site_rank(cfg, 0, rank))
            return {k: start[k] for k in ranks.sent_keys(cfg, start)}

        return expected

    def _start(self, rank: int) -> dict[str, torch.Tensor]:
        """A rank's starting adapter this round (what its sites trained from), computed once."""
        if rank not in self._starts:
            assert self.policy.rank_cfg is not None and self._global is not None
            self._starts[rank] = ranks.start_state(self.policy.rank_cfg, self._global, rank)
        return self._starts[rank]

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
            m: dict[str, Any] = dict(msg.content.metric_records.get(METRICS, {}))
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
    common: dict[str, Any] = dict(
        fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=min(fed.min_train_sites, fed.num_sites), min_evaluate_nodes=1 if fed.fraction_evaluate else 0,
        min_available_nodes=min(fed.num_sites, max(fed.min_train_sites, 1)),
    )
    if fed.sites_per_round:  # a fixed count: Flower samples max(int(n * fraction), min nodes)
        k = fed.sites_per_round
        common.update(fraction_train=k / fed.num_sites, min_train_nodes=k,
                      fraction_evaluate=k / fed.num_sites if fed.fraction_evaluate else 0.0,
                      min_evaluate_nodes=k if fed.fraction_evaluate else 0, min_available_nodes=max(k, 1))
    if base is FedProx:
        common["proximal_mu"] = cfg.train.proximal_mu
    if base in (FedAdam, FedYogi, FedAdagrad):
        common["eta"] = fed.server_lr
        common["eta_l"] = cfg.train.lr
    policy = MergePolicy.from_config(cfg)
    if base is FedAvg:
        return DeltaMerge(**common, policy=policy)
    return _over_deltas(base)(policy=policy, **common)  # type: ignore[arg-type]  # Flower's classes are ABCMeta


def _over_deltas(base: type[FedAvg]) -> type[DeltaMerge]:
    """``base``'s server logic (FedProx, FedAdam, ...) on top of DeltaMerge's aggregation: MRO
    base, DeltaMerge, FedAvg. Flower's __init__ takes no policy, so it is set first."""

    def __init__(self: DeltaMerge, *, policy: MergePolicy, **kwargs: Any) -> None:
        self.policy = policy
        base.__init__(self, **kwargs)

    return type(f"{base.__name__}OverDeltas", (base, DeltaMerge), {"__init__": __init__})
