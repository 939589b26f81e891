"""Pluggable merge rules for adapter deltas: pure functions over ``dict[str, Tensor]`` + weights.

``register_merge("name")`` adds a rule; ``create_merge("name")`` returns it. Strategies only call
the rule; heterogeneous-rank rules (zero-pad, SVD, stacking, frozen-A) plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensors = dict[str, torch.Tensor]
MergeFn = Callable[[Sequence[Tensors], Sequence[float]], Tensors]

_MERGES: dict[str, MergeFn] = {}


def register_merge(name: str) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        _MERGES[name] = fn
        return fn

    return deco


def create_merge(name: str) -> MergeFn:
    if name not in _MERGES:
        raise ValueError(f"merge={name!r}: unknown merge rule; registered: {', '.join(sorted(_MERGES))}")
    return _MERGES[name]


def available_merges() -> list[str]:
    return sorted(_MERGES)


from fedpeft.aggregation import fedavg as _fedavg  # noqa: E402,F401  (registers the built-ins)
from fedpeft.aggregation import robust as _robust  # noqa: E402,F401
