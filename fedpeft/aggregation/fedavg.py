"""Weighted mean of adapter deltas (FedAvg). Flower's ``aggregate_arrayrecords`` works on whole
records and float32 numpy; this one sums in float64 in a fixed order so runs are bitwise repeatable."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpeft.aggregation import Tensors, register_merge


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * t_i in float64, in the given order (so every run sums identically)."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        acc += t.to(torch.float64) * w
    return acc


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
    shares = [w / total for w in weights]
    return {k: weighted_sum([d[k] for d in deltas], shares).to(deltas[0][k].dtype) for k in deltas[0]}
