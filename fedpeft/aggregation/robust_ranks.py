"""Robust reductions composed with the heterogeneous-rank rules (``robust=`` with ``merge=``).

Hand-written: no library has robust merges over LoRA factors of mixed ranks. A coordinate-wise
median or trimmed mean needs coordinates that mean the same thing at every site, so it composes
with ``zero_pad`` (factors padded to the maximum rank, as HetLoRA averages them), ``frozen_a``
(only B is trained against a shared, nested A) and ``svd`` (the sites' dense updates s_k·B_k·A_k,
reduced, then truncated). ``stack`` concatenates per-site components and has no shared
coordinates: it takes ``norm_bound`` only (``fedpeft.ranks.bound_updates``, before any rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedpeft.aggregation.hetero import MergedModule, RankMergeError, check_factors, check_shared_a
from fedpeft.aggregation.robust import REDUCERS

Reducer = Callable[[Tensor], Tensor]
COMPOSABLE = ("zero_pad", "frozen_a", "svd")  # rank rules a coordinate-wise reduction composes with


create_reducer = REDUCERS.get


def _padded(ts: Sequence[Tensor], max_rank: int, *, dim: int) -> Tensor:
    """Stack factors zero-padded along ``dim`` (the rank) to ``max_rank``."""
    out = []
    for t in ts:
        t = t.double()
        pad = max_rank - t.shape[dim]
        out.append(torch.nn.functional.pad(t, (0, pad) if dim == 1 else (0, 0, 0, pad)))
    return torch.stack(out)


def robust_rank_merge(rule: str, reduce: Reducer, As: Sequence[Tensor], Bs: Sequence[Tensor],
                      scalings: Sequence[float], *, max_rank: int, shared_A: Tensor | None = None) -> MergedModule:
    """One LoRA module's merge under ``rule`` with ``reduce`` (unweighted, over sites) in place of
    the rule's weighted mean."""
    check_factors(As, Bs, scalings, [1.0] * len(As), max_rank)
    sB = [s * b.double() for b, s in zip(Bs, scalings)]
    if rule == "zero_pad":
        return MergedModule(reduce(_padded(As, max_rank, dim=0)), reduce(_padded(sB, max_rank, dim=1)))
    if rule == "frozen_a":
        if shared_A is None:
            raise RankMergeError("frozen_a needs the shared A")
        check_shared_a(As, shared_A, max_rank)
        return MergedModule(shared_A.double().clone(), reduce(_padded(sB, max_rank, dim=1)))
    if rule == "svd":
        W = reduce(torch.stack([b @ a.double() for b, a in zip(sB, As)]))
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = min(max_rank, S.shape[0])
        energy = float((S ** 2).sum())
        dropped = max(0.0, float((S[r:] ** 2).sum()) / energy) if energy > 0 else 0.0
        root = S[:r].sqrt()
        A = torch.zeros(max_rank, W.shape[1], dtype=torch.float64)
        B = torch.zeros(W.shape[0], max_rank, dtype=torch.float64)
        A[:r], B[:, :r] = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
        return MergedModule(A, B, dropped)
    raise RankMergeError(f"merge={rule!r}: a coordinate-wise reduction composes with {', '.join(COMPOSABLE)} only")
