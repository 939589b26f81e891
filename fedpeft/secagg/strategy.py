"""``DeltaMerge`` under secure aggregation: what its configure_train and aggregate_train do when
``secure-aggregation=true``. Reply validation keeps what a masked vector still allows (its size and
type, the site's round, the signed ledger entry binding the masked bytes); norm and magnitude
bounds cannot be checked on a masked vector: the report says so."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import save

from fedpeft.federation import ARRAYS, CONFIG, METRICS, STATUS, from_arrays, to_arrays
from fedpeft.io import atomic_write_bytes, atomic_write_json
from fedpeft.merging import add_delta
from fedpeft.privacy.ledger import LedgerError, delta_hash
from fedpeft.ranks import A_SUFFIX
from fedpeft.secagg import ddp, span
from fedpeft.secagg import protocol as sa
from fedpeft.secagg import server as secserver
from fedpeft.secagg import site as secagg_site
from fedpeft.secagg.layout import Layout
from fedpeft.secagg.site import MASKED

log = logging.getLogger(__name__)

NOT_CHECKED = ("per-coordinate update bound", "norm of each update", "robust merges")


class SecureRounds:
    """Per-round secure state held by the strategy between configure_train and aggregate_train."""

    def __init__(self) -> None:
        self.rounds: dict[int, secserver.SecureRound] = {}

    def configure(self, strat: Any, server_round: int, messages: list[Message], grid: Grid) -> list[Message]:
        """Stages 1-2 with the sampled nodes; train messages for the sites that shared their keys."""
        if not messages:
            return messages
        run_config = messages[0].content.config_records[CONFIG]
        rnd = secserver.setup(grid, [m.metadata.dst_node_id for m in messages], server_round=server_round,
                              run_config=run_config, fraction=strat.policy.secure_fraction,
                              min_sites=strat.policy.min_valid_replies, timeout=strat.policy.retry_timeout)
        self.rounds[server_round] = rnd
        plan = strat.policy.ddp
        if plan is not None and plan.max_epsilon and \
                plan.epsilon(len(ddp_releases(strat.policy.out_dir)) + 1, Layout.of(strat._global).size - 1) > plan.max_epsilon:
            log.warning("round %d: another distributed-DP release would exceed client-dp-max-epsilon=%g; round "
                        "skipped", server_round, plan.max_epsilon)
            return []
        if len(rnd.participants) < rnd.threshold:
            log.warning("round %d: %d sites shared secure-aggregation keys, below the threshold of %d; round "
                        "skipped", server_round, len(rnd.participants), rnd.threshold)
            return []
        out = []
        for site in rnd.participants:
            m = next(x for x in messages if x.metadata.dst_node_id == rnd.node_of[site])
            content = RecordDict({k: v for k, v in m.content.items()})
            content[CONFIG] = ConfigRecord({**dict(m.content.config_records[CONFIG]),
                                            "secagg-participants": json.dumps(rnd.participants)})
            out.append(Message(content=content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type))
        return out

    def aggregate(self, strat: Any, server_round: int, replies: list[Message], rlog: Any
                  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the masked replies, unmask their sum (stage 4), return global + mean delta."""
        rnd = self.rounds.get(server_round)
        glob = strat._global
        if rnd is None or glob is None or not rnd.participants:
            rlog.skipped = True
            return None, None
        frozen = strat.policy.merge == "frozen_a"  # the sum is the new adapter (A shared), not a delta
        layout = Layout.of({k: v for k, v in glob.items() if not (frozen and k.endswith(A_SUFFIX))})
        plan = strat.policy.ddp
        sent: dict[int, np.ndarray] = {}
        hashes, metrics, keys_of = {}, {}, {}  # without DDP the train replies carry range vectors (``span``)
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if not msg.has_content():
                    raise ValueError(str(msg.error.reason) if msg.has_error() else "an empty reply")
                site, vec, sha, m = self._check(strat, rnd, msg, 2 if plan is None else layout.size, server_round)
                keys_of[site] = str(dict(msg.content.config_records.get(STATUS, {})).get("public-key") or "")
            except ValueError as e:
                rlog.rejected.append(f"node {node}: {e}")
                rlog.failures.append({"node": node, "site": None, "round": server_round, "reason": str(e)})
                log.warning("round %d: rejected secure reply from node %d: %s", server_round, node, e)
                continue
            if vec is None:
                rlog.declined[site] = str(m.pop("reason", ""))
                continue
            sent[site], hashes[site], metrics[site] = vec, sha, m
        ranges: dict[int, np.ndarray] = {}
        bits = span.FALLBACK
        if plan is None:
            ranges = sent
            if ranges and set(ranges) == set(rnd.participants):  # the range masks cancel only in the full sum
                bits = span.plan_bits(span.range_total(ranges))
            got = secserver.collect_vectors(strat._grid, rnd, sorted(ranges), bits, layout.size,
                                            timeout=strat.policy.retry_timeout)
            masked = {}
            for s, (vec, raw, line) in got.items():
                try:
                    self._accept_vector_entry(strat, s, line, secagg_site.vector_fields(
                        server_round, bits, hashes[s], hashlib.sha256(raw).hexdigest()), keys_of.get(s, ""))
                except (LedgerError, ValueError) as e:
                    log.warning("round %d: site %d's vector dropped: %s", server_round, s, e)
                    rlog.failures.append({"node": rnd.node_of[s], "site": s, "round": server_round, "reason": str(e)})
                    continue
                masked[s] = vec
        else:
            masked = sent
        try:
            total, seeds, keys = secserver.unmask_round(strat._grid, rnd, masked, timeout=strat.policy.retry_timeout)
        except sa.SecAggError as e:
            log.warning("round %d: %s", server_round, e)
            rlog.failures.append({"node": None, "site": None, "round": server_round, "reason": str(e)})
            rlog.skipped = True
            return None, None
        if plan is None:
            mean, weight = layout.unpack_mean(span.decode(total, bits))
        else:  # integers: the summed rounded updates over s, then over the number of sites
            vals = total.view(np.int64).astype(np.float64)
            vals[:-1] /= ddp.scale_for(clip=plan.clip, dim=layout.size - 1)
            mean, weight = layout.unpack_mean(vals)
        self._keep_evidence(strat, rnd, masked, hashes, seeds, keys, ranges=ranges, bits=bits)
        if plan is not None:
            rlog.client_epsilon = plan.epsilon(len(ddp_releases(strat.policy.out_dir)), layout.size - 1)
        for s in masked:
            rlog.train[s] = metrics[s]
            rlog.merged[s] = hashes[s]
            if frozen:
                rlog.ranks[s] = int(metrics[s].get("lora-rank", 0))
        if frozen:
            new_global = {**glob, **{k: v.to(glob[k].dtype) for k, v in mean.items()}}
        else:
            new_global = add_delta(glob, {k: v.to(glob[k].dtype) for k, v in mean.items()})
        return to_arrays(new_global), MetricRecord({"num-examples": weight, "sites": len(masked)})

    @staticmethod
    def _check(strat: Any, rnd: secserver.SecureRound, msg: Message, size: int, server_round: int
               ) -> tuple[int, Any, str, dict]:
        if msg.has_error():
            raise ValueError(str(msg.error.reason))
        m = dict(msg.content.metric_records.get(METRICS, {}))
        site = m.get("site")
        if not isinstance(site, (int, float)) or int(site) not in rnd.node_of or \
                rnd.node_of[int(site)] != msg.metadata.src_node_id:
            raise ValueError(f"site={site!r}: not the site this node advertised keys for")
        site = int(site)
        if float(m.get("server-round", server_round)) != server_round:  # type: ignore[arg-type]
            raise ValueError(f"server-round={m.get('server-round')}: a stale reply (this is round {server_round})")
        status = dict(msg.content.config_records.get(STATUS, {}))
        if status.get("status") == "declined":
            return site, None, "", {"reason": status.get("reason", "")}
        if ARRAYS not in msg.content.array_records:
            raise ValueError("reply has no masked vector")
        sent = from_arrays(msg.content.array_records[ARRAYS])
        vec = secserver.masked_vector(sent, size)
        sha = delta_hash(sent)
        ledgers = strat.policy.ledgers
        if ledgers is not None:
            if "ledger" not in status:
                raise ValueError(f"ledger: site {site} sent no signed ledger; a DP release must carry one")
            try:
                ledgers.accept(site=site, data=str(status["ledger"]).encode(), public_key=str(status.get("public-key")),
                               server_round=server_round, delta_sha256=sha)
            except LedgerError as e:
                raise ValueError(f"ledger: {e}") from None
        return site, vec, sha, {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}

    @staticmethod
    def _accept_vector_entry(strat: Any, site: int, line: bytes, fields: dict, public_key: str) -> None:
        """A vector's ledger line: the entry the site signed for it (its ring, its range vector, the
        bytes' hash), chained onto the coordinator's copy of its ledger. Raises naming what differs."""
        entry = json.loads(line)
        if not isinstance(entry, dict) or entry.get("kind") != secagg_site.VECTOR_ENTRY or \
                {k: entry.get(k) for k in fields} != fields:
            raise ValueError("its ledger entry does not bind the vector, its range vector and the round's ring")
        ledgers = strat.policy.ledgers
        if ledgers is not None:  # verified against the site's pinned key, and it must extend the copy
            path = ledgers.ledger_path(site)
            ledgers.sync(site=site, data=(path.read_bytes() if path.exists() else b"") + line, public_key=public_key)

    @staticmethod
    def _keep_evidence(strat: Any, rnd: secserver.SecureRound, masked: dict, hashes: dict, seeds: dict,
                       keys: dict, *, ranges: dict, bits: span.Bits) -> None:
        """For the audit: the masked vectors and range vectors (each reveals nothing alone), the round's
        signed adverts and the reconstruction the coordinator learnt anyway (self-mask seeds of the
        survivors, mask keys of the dropped sites). The sites' ledgers bind the vectors."""
        if not strat.policy.out_dir:
            return
        folder = Path(strat.policy.out_dir) / "secagg" / f"round-{rnd.server_round:06d}"
        for s, vec in masked.items():
            kept = vec.astype(np.uint32).view(np.int32) if bits.ring_bits == span.NARROW else vec.view("int64")
            atomic_write_bytes(folder / f"site-{s}.safetensors", save({"masked": torch.from_numpy(kept.copy())}))
        for s, vec in ranges.items():
            atomic_write_bytes(folder / f"range-{s}.safetensors", save({MASKED: torch.from_numpy(vec.view("int64").copy())}))
        atomic_write_json(folder / "round.json", {
            **({"range_senders": sorted(ranges), "ring": bits.as_dict()} if ranges else {}),
            "round": rnd.server_round, "threshold": rnd.threshold,
            "participants": rnd.participants,
            "survivors": sorted(masked), "dropped": rnd.dropped, "adverts": rnd.adverts, "sha256": hashes,
            "seeds": {s: b.hex() for s, b in seeds.items()}, "mask_keys": {s: k.hex() for s, k in keys.items()},
            "stage_bytes_up": rnd.stage_bytes_up, "not_checked": list(NOT_CHECKED), "merge": strat.policy.merge,
            "ddp": None if strat.policy.ddp is None else _ddp_record(strat.policy.ddp, next(iter(masked.values())).size,
                                                                      rnd.threshold)})


def _ddp_record(plan: ddp.DdpPlan, size: int, threshold: int) -> dict[str, object]:
    dim = size - 1
    return {"mechanism": "skellam", "noise_multiplier": plan.noise_multiplier, "clip": plan.clip, "dim": dim,
            "scale": ddp.scale_for(clip=plan.clip, dim=dim), "total_variance": plan.total_variance(dim),
            "threshold": threshold, "delta": plan.delta}


def ddp_releases(out_dir: str | None) -> list[dict]:
    """The distributed-DP releases a run made so far, from its kept rounds (so a resumed run counts them)."""
    if not out_dir:
        return []
    out = []
    for f in sorted((Path(out_dir) / "secagg").glob("round-*/round.json")):
        rec = json.loads(f.read_text()).get("ddp")
        if rec:
            out.append(rec)
    return out
