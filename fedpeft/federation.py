"""Flower glue shared by both apps: tensors <-> records, and the one place replies are validated."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.adapters import AdapterStateError, check_adapter_state

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"


class ReplyError(ValueError):
    """A site's reply is malformed; it is rejected and the round goes on without it."""


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors as an ArrayRecord, keys sorted so every run serialises identically."""
    return ArrayRecord(OrderedDict((k, state[k].detach().cpu().contiguous()) for k in sorted(state)))


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def config_record(flat: Mapping[str, object]) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in flat.items() if isinstance(v, (str, int, float, bool))})


@dataclass
class TrainReply:
    site: int
    delta: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


def validate_train_reply(content: RecordDict, *, expected: Mapping[str, torch.Tensor]) -> TrainReply:
    """Check a train reply against the global adapter's keys and shapes; raise ReplyError naming the field."""
    if ARRAYS not in content.array_records:
        raise ReplyError(f"reply has no ArrayRecord {ARRAYS!r} (has {list(content.array_records)})")
    if METRICS not in content.metric_records:
        raise ReplyError(f"reply has no MetricRecord {METRICS!r}")
    metrics = dict(content.metric_records[METRICS])
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or n <= 0 or not math.isfinite(n):
        raise ReplyError(f"{NUM_EXAMPLES}={n!r}: must be a positive number")
    site = metrics.get("site")
    if not isinstance(site, (int, float)) or site < 0:
        raise ReplyError(f"site={site!r}: must be a non-negative site id")
    try:
        delta = from_arrays(content.array_records[ARRAYS])
    except Exception as e:  # undecodable arrays are a malformed reply, not a server crash
        raise ReplyError(f"{ARRAYS}: cannot decode ({e})") from None
    try:
        check_adapter_state(expected, delta)
    except AdapterStateError as e:
        raise ReplyError(f"{ARRAYS}: {e}") from None
    return TrainReply(site=int(site), delta=delta, num_examples=int(n),
                      metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """Numbers only; non-finite values (an empty test split's accuracy) are left out, not sent as NaN."""
    return MetricRecord({k: v for k, v in values.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
