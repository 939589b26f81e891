"""Weighted mean of adapter deltas (FedAvg). Flower's ``aggregate_arrayrecords`` works on whole
records and float32 numpy; this one sums in float64 in a fixed order so runs are bitwise repeatable."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpeft.aggregation import Tensors, register_merge


@register_merge("fedavg")
def fedavg(deltas: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """sum_i w_i * delta_i / sum_i w_i for every key; all deltas must share keys and shapes."""
    if not deltas:
        raise ValueError("fedavg: no deltas to merge")
    if len(deltas) != len(weights):
        raise ValueError(f"fedavg: {len(deltas)} deltas but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"fedavg: weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(deltas[0])
    out: Tensors = {}
    for k in keys:
        acc = torch.zeros_like(deltas[0][k], dtype=torch.float64)
        for d, w in zip(deltas, weights):
            acc += d[k].to(torch.float64) * (w / total)
        out[k] = acc.to(deltas[0][k].dtype)
    return out
