"""Flower glue shared by both apps: tensors <-> records, and the one place replies are validated."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft import compression
from fedpeft.adapters import AdapterStateError, check_adapter_state
from fedpeft.privacy.ledger import LedgerError, ServerCopies, delta_hash
from fedpeft.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, STATUS  # noqa: F401  (re-exported)
from fedpeft.reply import Reply


class ReplyError(ValueError):
    """A site's reply is malformed; it is rejected and the round goes on without it."""


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors as an ArrayRecord, keys sorted so every run serialises identically."""
    return ArrayRecord(OrderedDict((k, state[k].detach().cpu().contiguous()) for k in sorted(state)))


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def config_record(flat: Mapping[str, object]) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in flat.items() if isinstance(v, (str, int, float, bool))})


def status_record(reply: Reply) -> ConfigRecord:
    """A site's ``Reply`` status, reason and signed ledger as a ConfigRecord."""
    rec: dict[str, Any] = {"status": reply.status, "reason": reply.reason}
    if reply.ledger is not None:
        rec["ledger"] = reply.ledger.decode()
        rec["public-key"] = str(reply.public_key)
    return ConfigRecord(rec)


def _status(content: RecordDict) -> tuple[str, str, bytes | None, str | None]:
    if STATUS not in content.config_records:
        return "trained", "", None, None
    rec = dict(content.config_records[STATUS])
    status = rec.get("status", "trained")
    if status not in ("trained", "declined"):
        raise ReplyError(f"status={status!r}: must be 'trained' or 'declined'")
    ledger = rec.get("ledger")
    if ledger is not None and not isinstance(ledger, str):
        raise ReplyError(f"ledger: must be text, got {type(ledger).__name__}")
    pub = rec.get("public-key")
    return str(status), str(rec.get("reason", "")), (ledger.encode() if ledger else None), \
        (str(pub) if pub else None)


@dataclass
class ReplyLimits:
    """What no honest reply exceeds: payload size, example count, and (DP runs) how far a site's
    optimiser can move any coordinate in one round (``max_update(reply)``, see ``update_bounds``)."""

    max_bytes: int = 64 * 2**20
    max_examples: int = 10_000_000
    server_round: int | None = None  # replies must echo the round they answer
    max_update: Callable[[Reply], float] | None = None


def _payload_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def validate_train_reply(content: RecordDict, *, expected: Mapping[str, torch.Tensor],
                         ledgers: ServerCopies | None = None, server_round: int = 0,
                         expected_for: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
                         limits: ReplyLimits | None = None, delta_format: str = "float32") -> Reply:
    """Check a train reply against the global adapter's keys, shapes and dtypes (with mixed ranks,
    ``expected_for(declared lora-rank)``), against ``limits`` (size, example count, stale round,
    update magnitude) and, with ``ledgers`` (DP runs), against the site's signed ledger; raise
    ReplyError naming the field. ``delta_format``: how sites send deltas; the ledger hash is checked
    on the tensors as sent, everything else on their decoded float32 values."""
    limits = limits or ReplyLimits()
    if ARRAYS in content.array_records:
        size = _payload_bytes(content.array_records[ARRAYS])
        if size > limits.max_bytes:
            raise ReplyError(f"{ARRAYS}: payload of {size} bytes is over the limit of {limits.max_bytes} bytes")
    metrics: dict[str, Any] = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
    if limits.server_round is not None and "server-round" in metrics and \
            int(metrics["server-round"]) != limits.server_round:
        raise ReplyError(f"server-round={int(metrics['server-round'])}: a stale reply (this is round "
                         f"{limits.server_round})")
    n = metrics.get(NUM_EXAMPLES)
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > limits.max_examples:
        raise ReplyError(f"{NUM_EXAMPLES}={n!r}: absurdly large (limit {limits.max_examples})")
    reply = _validate_content(content, expected=expected, expected_for=expected_for, delta_format=delta_format)
    if reply.delta is not None and limits.max_update is not None:
        bound = limits.max_update(reply)
        worst = max(float(t.abs().max()) for t in reply.delta.values() if t.numel())
        if worst > bound:
            raise ReplyError(f"{ARRAYS}: an update of {worst:.4g} in one coordinate is beyond what the optimiser "
                             f"can move it in this round's steps ({bound:.4g}; DP clipping and the learning rate "
                             "bound it)")
    if ledgers is not None:
        if reply.ledger is None or not reply.public_key:
            raise ReplyError(f"ledger: site {reply.site} sent no signed ledger; a DP release must carry one")
        try:
            ledgers.accept(site=reply.site, data=reply.ledger, public_key=reply.public_key,
                           server_round=server_round,
                           delta_sha256=reply.sent_sha256)
        except LedgerError as e:
            raise ReplyError(f"ledger: {e}") from None
    return reply


def _validate_content(content: RecordDict, *, expected: Mapping[str, torch.Tensor],
                      expected_for: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
                      delta_format: str = "float32") -> Reply:
    if METRICS not in content.metric_records:
        raise ReplyError(f"reply has no MetricRecord {METRICS!r}")
    metrics: dict[str, Any] = dict(content.metric_records[METRICS])
    status, reason, ledger, pub = _status(content)
    if status == "declined":
        site = metrics.get("site")
        if not isinstance(site, (int, float)) or site < 0:
            raise ReplyError(f"site={site!r}: must be a non-negative site id")
        return Reply(status=status, delta=None, metrics={"site": float(int(site))}, reason=reason, ledger=ledger,
                     public_key=pub)
    if ARRAYS not in content.array_records:
        raise ReplyError(f"reply has no ArrayRecord {ARRAYS!r} (has {list(content.array_records)})")
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or n <= 0 or not math.isfinite(n):
        raise ReplyError(f"{NUM_EXAMPLES}={n!r}: must be a positive number")
    site = metrics.get("site")
    if not isinstance(site, (int, float)) or site < 0:
        raise ReplyError(f"site={site!r}: must be a non-negative site id")
    try:
        sent = from_arrays(content.array_records[ARRAYS])
    except Exception as e:  # undecodable arrays are a malformed reply, not a server crash
        raise ReplyError(f"{ARRAYS}: cannot decode ({e})") from None
    try:
        delta = compression.decode(sent, delta_format)
    except compression.CompressionError as e:
        raise ReplyError(f"{ARRAYS}: delta-format={delta_format!r}: {e}") from None
    if expected_for is not None:  # mixed ranks: the reply's declared rank fixes its shapes
        rank = metrics.get("lora-rank")
        if not isinstance(rank, (int, float)) or isinstance(rank, bool) or not float(rank).is_integer():
            raise ReplyError(f"lora-rank={rank!r}: a reply must declare its integer LoRA rank")
        try:
            expected = expected_for(int(rank))
        except ValueError as e:
            raise ReplyError(f"lora-rank={int(rank)}: {e}") from None
    try:
        check_adapter_state(expected, delta)
    except AdapterStateError as e:
        raise ReplyError(f"{ARRAYS}: {e}" + (f" (declared lora-rank={int(metrics['lora-rank'])})"
                                             if expected_for is not None else "")) from None
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    values.update({"site": float(int(site)), NUM_EXAMPLES: float(int(n))})
    return Reply(status=status, delta=delta, metrics=values, reason=reason, ledger=ledger, public_key=pub,
                 sent_sha256=delta_hash(sent))


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """Numbers only; non-finite values (an empty test split's accuracy) are left out, not sent as NaN."""
    return MetricRecord({k: v for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
