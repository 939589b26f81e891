"""Mixed LoRA ranks in a federation, on whole adapter states: which rank a site trains, the
adapter it starts each round from (the rule's projection of the global one), and the server's
merge of the sites' adapters (``fedpeft.aggregation.hetero`` per module, FedAvg for the rest).

The global adapter always has LoRA scaling 1 (lora_alpha = r, or √r with rsLoRA): its update is
B·A, whatever the sites' own α and ranks. Sites send deltas against their starting adapter, so
only deltas ever leave a site; the server adds the same starting adapter back before merging.

Per rule, site k (rank r_k, scaling s_k) starts from:
- ``zero_pad``, ``svd``, ``frozen_a``: the leading r_k components, A_g[:r_k] and B_g[:, :r_k]/s_k
  (for ``svd`` that is the best rank-r_k approximation of the global update); under ``frozen_a``
  A is the shared frozen A and only B is trained and sent.
- ``stack``: its frozen base plus the global update folded in (W₀ + B_g·A_g), and a fresh adapter
  (the seeded rank-r_k initialisation, B = 0): FLoRA's restart. The global adapter is the stack
  of every round's stacked updates, so it grows by Σ r_k per round and loads like any LoRA.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import torch

from fedpeft.aggregation.fedavg import fedavg
from fedpeft.aggregation.hetero import MergedModule, create_rank_merge, lora_scaling, project
from fedpeft.aggregation.robust import bounded
from fedpeft.aggregation.robust_ranks import create_reducer, robust_rank_merge
from fedpeft.config import AdapterConfig, RunConfig

Tensors = dict[str, torch.Tensor]
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def site_rank(cfg: RunConfig, site: int, declared: int | None = None) -> int:
    """Cycling rule: site k trains ``lora-ranks[k mod n]``; a deployed site's node config may
    declare its own, which must be one of them."""
    ranks = cfg.adapter.rank_list
    if declared is not None:
        if declared not in ranks:
            raise ValueError(f"lora-rank={declared!r}: not one of the run's lora-ranks {ranks}")
        return declared
    return ranks[site % len(ranks)]


def site_scaling(cfg: RunConfig, rank: int) -> float:
    return lora_scaling(cfg.adapter.alpha, rank, rslora=cfg.adapter.use_rslora)


def site_adapter(cfg: RunConfig, rank: int) -> AdapterConfig:
    return dataclasses.replace(cfg.adapter, rank=rank, ranks="")


def global_adapter(cfg: RunConfig, rank: int) -> AdapterConfig:
    """The global adapter's PEFT config: rank ``rank`` with scaling 1 (α = r, or √r with rsLoRA)."""
    alpha = rank**0.5 if cfg.adapter.use_rslora else float(rank)
    return dataclasses.replace(cfg.adapter, rank=rank, alpha=alpha, ranks="")


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module prefixes that carry a LoRA pair, in a fixed order."""
    return sorted(k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX))


def state_rank(state: Mapping[str, torch.Tensor]) -> int:
    mods = lora_modules(state)
    return int(state[mods[0] + A_SUFFIX].shape[0]) if mods else 0


@functools.lru_cache(maxsize=16)
def _fresh(model_fields: tuple, adapter_fields: tuple, labels: tuple[str, ...], seed: int) -> Tensors:
    from fedpeft import factory
    from fedpeft.config import ModelConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory.new_model(ModelConfig(*model_fields), AdapterConfig(*adapter_fields), labels, dp=False)
        from fedpeft.adapters import get_adapter_state

        return get_adapter_state(model)


def fresh_state(cfg: RunConfig, rank: int) -> Tensors:
    """The seeded rank-``rank`` initial adapter (A random, B zero): a site's restart under ``stack``."""
    state = _fresh(dataclasses.astuple(cfg.model), dataclasses.astuple(site_adapter(cfg, rank)),
                   tuple(cfg.data.label_list), cfg.train.seed)
    return {k: v.clone() for k, v in state.items()}


def start_state(cfg: RunConfig, global_state: Mapping[str, torch.Tensor], rank: int) -> Tensors:
    """A site's starting adapter for the round (see the module docstring), float32."""
    rule = cfg.rank_rule
    s = site_scaling(cfg, rank)
    if rule == "stack":
        out = fresh_state(cfg, rank)
        for k, v in global_state.items():
            if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX)):
                out[k] = v.clone()
        return out
    out = {}
    for k, v in global_state.items():
        if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX)):
            out[k] = v.clone()
    for m in lora_modules(global_state):
        a, b = project(global_state[m + A_SUFFIX].double(), global_state[m + B_SUFFIX].double(), rank, s)
        out[m + A_SUFFIX], out[m + B_SUFFIX] = a.float(), b.float()
    return out


def sent_keys(cfg: RunConfig, state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys a site sends: everything it trains (under ``frozen_a``, not the frozen A)."""
    return [k for k in state if not (cfg.rank_rule == "frozen_a" and k.endswith(A_SUFFIX))]


def frozen_a_part(cfg: RunConfig, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                  rank: int | None) -> Tensors:
    """A site's summand for ``frozen_a`` under secure aggregation (``merge_states``' weighted sum,
    taken term by term): s_r * B zero-padded to the global rank, and every dense tensor; A stays
    shared and frozen, so it is not sent."""
    assert rank is not None, "frozen_a: a site trains at a declared rank"
    s = site_scaling(cfg, rank)
    out: Tensors = {}
    for k in sent_keys(cfg, dict(local)):
        v = local[k].detach().double()
        if k.endswith(B_SUFFIX):
            full = torch.zeros(global_state[k].shape, dtype=torch.float64)
            full[:, : v.shape[1]] = s * v
            v = full
        out[k] = v
    return out


def folded_update(global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``stack``: per LoRA module, the dense update B_g·A_g a site folds into its frozen base."""
    return {m: global_state[m + B_SUFFIX].double() @ global_state[m + A_SUFFIX].double()
            for m in lora_modules(global_state)}


def bound_updates(cfg: RunConfig, global_state: Mapping[str, torch.Tensor],
                  locals_: Sequence[tuple[Mapping[str, torch.Tensor], int, float]]
                  ) -> list[tuple[Tensors, int, float]]:
    """``robust='norm_bound'`` before any rank rule: each site's update (its local adapter minus
    the start it was sent) scaled to L2 norm at most the median of the updates' norms."""
    starts = {r: start_state(cfg, global_state, r) for r in {r for _, r, _ in locals_}}
    deltas = [{k: st[k].double() - starts[r][k].double() for k in st} for st, r, _ in locals_]
    return [({k: (starts[r][k].double() + d[k]).to(st[k].dtype) for k in st}, r, w)
            for (st, r, w), d in zip(locals_, bounded(deltas))]


def merge_states(cfg: RunConfig, global_state: Mapping[str, torch.Tensor],
                 locals_: Sequence[tuple[Mapping[str, torch.Tensor], int, float]]
                 ) -> tuple[Tensors, dict[str, float]]:
    """New global adapter from the sites' (local adapter, rank, weight); plus, per module, the share
    of the merged update's energy that truncation dropped (``svd``; 0 for exact rules). With
    ``robust`` set, a coordinate-wise reduction replaces the weighted means (``robust_ranks``) or
    the updates are norm-bounded first (``bound_updates``)."""
    rule = cfg.rank_rule
    assert rule is not None
    fn = create_rank_merge(rule)
    robust = cfg.federation.robust
    if robust == "norm_bound":
        locals_ = bound_updates(cfg, global_state, locals_)
    reduce = create_reducer(robust) if robust in ("median", "trimmed_mean") else None
    weights = [w for _, _, w in locals_]
    dense = [k for k in global_state if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))]
    out: Tensors = {}
    if reduce is not None:  # the head and anything not LoRA: the robust reduction, or FedAvg
        for k in dense:
            out[k] = reduce(torch.stack([state[k].double() for state, _, _ in locals_])).to(global_state[k].dtype)
    elif dense:
        out = fedavg([{k: state[k] for k in dense} for state, _, _ in locals_], weights)
    dropped: dict[str, float] = {}
    max_rank = cfg.adapter.max_rank
    scalings = [site_scaling(cfg, r) for _, r, _ in locals_]
    for m in lora_modules(global_state):
        As = [st[m + A_SUFFIX] for st, _, _ in locals_]
        Bs = [st[m + B_SUFFIX] for st, _, _ in locals_]
        extra = {"shared_A": global_state[m + A_SUFFIX].double()} if rule == "frozen_a" else {}
        merged: MergedModule = (fn(As, Bs, scalings, weights, max_rank=max_rank, **extra) if reduce is None
                                else robust_rank_merge(rule, reduce, As, Bs, scalings, max_rank=max_rank, **extra))
        if rule == "stack":  # this round's stack joins every earlier round's (each folded by then)
            merged = MergedModule(torch.cat([global_state[m + A_SUFFIX].double(), merged.A], 0),
                                  torch.cat([global_state[m + B_SUFFIX].double(), merged.B], 1))
        out[m + A_SUFFIX] = merged.A.float()
        out[m + B_SUFFIX] = merged.B.float()
        dropped[m] = merged.dropped_energy
    return out, dropped
