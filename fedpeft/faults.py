"""Fault and attack injection for simulations: which sites crash in a round, which sites are
poisoned and what they send. Pure functions of the run seed, site and round, so a run repeats;
a deployed site refuses any run config that asks for them (``policy.check_noise_source``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.config import RunConfig


class InjectedFault(RuntimeError):
    """A crash or hang injected on purpose (``fault-crash``, ``fault-hang``; simulations only)."""


def attackers(cfg: RunConfig) -> set[int]:
    """Which sites attack (``attack``, simulations only): a seeded choice of attack-fraction of them."""
    fed = cfg.federation
    if fed.attack == "none":
        return set()
    k = int(round(fed.attack_fraction * fed.num_sites))
    return set(np.random.default_rng([cfg.train.seed, 7]).permutation(fed.num_sites)[:k].tolist())


def attacked(cfg: RunConfig, site: int, server_round: int, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an attacking site sends instead of its honest delta."""
    fed = cfg.federation
    if fed.attack == "sign-flip":
        return {k: -fed.attack_scale * v for k, v in delta.items()}
    if fed.attack == "scale":
        return {k: fed.attack_scale * v for k, v in delta.items()}
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.train.seed, site, server_round, 5]).generate_state(1)[0]))
    norm = float(torch.sqrt(torch.stack([(v.double() ** 2).sum() for v in delta.values()]).sum()))
    n = sum(v.numel() for v in delta.values())
    return {k: torch.randn(v.shape, generator=g) * (fed.attack_scale * norm / n**0.5) for k, v in delta.items()}


def is_late(cfg: RunConfig, site: int, server_round: int) -> bool:
    """Fault injection: does this site answer late in this round (seed, site, round)?"""
    if cfg.federation.fault_late <= 0:
        return False
    return bool(np.random.default_rng([cfg.train.seed, site, server_round, 98]).random() < cfg.federation.fault_late)


def hangs(cfg: RunConfig, site: int, server_round: int) -> bool:
    """Fault injection: does this site hang in this round (seed, site, round)?"""
    if cfg.federation.fault_hang <= 0:
        return False
    return bool(np.random.default_rng([cfg.train.seed, site, server_round, 97]).random() < cfg.federation.fault_hang)


def crashes(cfg: RunConfig, site: int, server_round: int) -> bool:
    """Fault injection: does this site crash in this round (a pure function of seed, site, round)?"""
    if cfg.federation.fault_crash <= 0:
        return False
    u = np.random.default_rng([cfg.train.seed, site, server_round, 99]).random()
    return bool(u < cfg.federation.fault_crash)
