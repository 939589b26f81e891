"""One round's merge, free of Flower: the new global adapter from the sites' validated replies.
The strategy (``fedpeft.strategy.DeltaMerge``) and the in-process loop (``fedpeft.inprocess``)
both call it, so a benchmark measures the very merge the apps run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedpeft import ranks
from fedpeft.aggregation import MergeFn
from fedpeft.config import RunConfig
from fedpeft.reply import Reply

Tensors = dict[str, torch.Tensor]


@dataclass
class MergeInfo:
    ranks: dict[int, int] = field(default_factory=dict)  # site -> LoRA rank it trained (rank rules)
    dropped_by_module: dict[str, float] = field(default_factory=dict)  # svd: energy cut by truncation


def add_delta(glob: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: glob[k] + merged[k].to(glob[k].dtype) for k in glob}


def merge_replies(glob: Mapping[str, torch.Tensor], replies: Sequence[Reply], *, merge_fn: MergeFn | None = None,
                  rank_cfg: RunConfig | None = None,
                  start: Callable[[int], Mapping[str, torch.Tensor]] | None = None) -> tuple[Tensors, MergeInfo]:
    """``glob`` + ``merge_fn`` of the deltas weighted by example counts; with a rank rule (``rank_cfg``), each site's
    local adapter rebuilt (its rank's start + its delta) and merged by rank (``ranks.merge_states``).
    ``replies`` in a fixed order (by site) make the merge bitwise repeatable."""
    info = MergeInfo()
    if rank_cfg is None:
        assert merge_fn is not None, "a same-shaped merge needs a merge rule"
        deltas = [r.delta for r in replies if r.delta is not None]
        return add_delta(glob, merge_fn(deltas, [float(r.num_examples) for r in replies])), info
    starts: dict[int, Mapping[str, torch.Tensor]] = {}
    locals_ = []
    for r in replies:
        assert r.delta is not None
        rank = int(r.metrics["lora-rank"])
        if rank not in starts:
            starts[rank] = start(rank) if start is not None else ranks.start_state(rank_cfg, dict(glob), rank)
        s = starts[rank]
        locals_.append(({k: v + r.delta[k].to(v.dtype) if k in r.delta else v for k, v in s.items()},
                        rank, float(r.num_examples)))
        info.ranks[r.site] = rank
    new_global, info.dropped_by_module = ranks.merge_states(rank_cfg, dict(glob), locals_)
    return new_global, info
