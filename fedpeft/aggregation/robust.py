"""Robust merges for adapter deltas: coordinate-wise median, trimmed mean and norm bounding.

Flower ships FedMedian/FedTrimmedAvg as whole strategies over numpy model arrays; fedpeft needs
them as merge rules over deltas, after its own validation, composable with its strategies, so
they are small pure functions here (same maths: Yin et al. 2018; Sun et al. 2019 for norm bounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedpeft.aggregation import Tensors, register_merge
from fedpeft.aggregation.fedavg import fedavg
from fedpeft.registry import Registry


def _check(deltas: Sequence[Tensors], weights: Sequence[float], name: str) -> None:
    if not deltas:
        raise ValueError(f"{name}: no deltas to merge")
    if len(deltas) != len(weights):
        raise ValueError(f"{name}: {len(deltas)} deltas but {len(weights)} weights")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"{name}: weights must be >= 0 with a positive sum, got {list(weights)}")


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 (the sites); with an even count, the mean of the two middle values."""
    s, _ = stacked.sort(dim=0)
    n = s.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def coordinate_trimmed_mean(stacked: torch.Tensor, trim: float = 0.2) -> torch.Tensor:
    """Mean over dim 0 after dropping the ``trim`` fraction of largest and of smallest values (at
    least one each side when trim > 0 and there are 3 or more sites)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim={trim!r}: must be in [0, 0.5)")
    n = stacked.shape[0]
    cut = int(trim * n)
    if trim > 0 and n >= 3:
        cut = max(cut, 1)
    s, _ = stacked.sort(dim=0)
    return s[cut:n - cut].mean(dim=0)


REDUCERS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("coordinate-wise reduction", "robust")
REDUCERS.add("median", coordinate_median)
REDUCERS.add("trimmed_mean", coordinate_trimmed_mean)


@register_merge("median")
def median(deltas: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Coordinate-wise median of the deltas (unweighted: a weight is a claim an attacker controls)."""
    _check(deltas, weights, "median")
    return {k: coordinate_median(torch.stack([d[k].double() for d in deltas])).to(deltas[0][k].dtype)
            for k in deltas[0]}


def trimmed_mean(deltas: Sequence[Tensors], weights: Sequence[float], *, trim: float = 0.2) -> Tensors:
    """Coordinate-wise trimmed mean of the deltas (``coordinate_trimmed_mean``; unweighted)."""
    _check(deltas, weights, "trimmed_mean")
    return {k: coordinate_trimmed_mean(torch.stack([d[k].double() for d in deltas]), trim).to(deltas[0][k].dtype)
            for k in deltas[0]}


register_merge("trimmed_mean")(trimmed_mean)


def delta_norm(delta: Tensors) -> float:
    return float(torch.sqrt(torch.stack([(t.double() ** 2).sum() for t in delta.values()]).sum()))


def bounded(deltas: Sequence[Tensors], *, bound: float | None = None) -> list[Tensors]:
    """Every delta scaled to L2 norm at most ``bound`` (default: the median of the deltas' norms)."""
    norms = [delta_norm(d) for d in deltas]
    if bound is None:
        bound = float(coordinate_median(torch.tensor(norms, dtype=torch.float64)))
    return [{k: v * min(1.0, bound / n) if n > 0 else v for k, v in d.items()} for d, n in zip(deltas, norms)]


@register_merge("norm_bound")
def norm_bound(deltas: Sequence[Tensors], weights: Sequence[float], *, bound: float | None = None) -> Tensors:
    """Weighted mean after scaling every delta to L2 norm at most ``bound`` (default: the median of
    the deltas' norms, so a few huge deltas cannot dominate)."""
    _check(deltas, weights, "norm_bound")
    return fedavg(bounded(deltas, bound=bound), weights)
