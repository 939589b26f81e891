"""Pluggable merge rules for adapter deltas: pure functions over ``dict[str, Tensor]`` + weights.

``register_merge("name")`` adds a rule; ``create_merge("name")`` returns it. Strategies only call
the rule; heterogeneous-rank rules (zero-pad, SVD, stacking, frozen-A) plug in here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedpeft.registry import Registry

Tensors = dict[str, torch.Tensor]
MergeFn = Callable[[Sequence[Tensors], Sequence[float]], Tensors]

MERGES: Registry[MergeFn] = Registry("merge rule", "merge")
register_merge = MERGES.register
create_merge = MERGES.get
available_merges = MERGES.names


from fedpeft.aggregation import fedavg as _fedavg  # noqa: E402,F401  (registers the built-ins)
from fedpeft.aggregation import robust as _robust  # noqa: E402,F401
