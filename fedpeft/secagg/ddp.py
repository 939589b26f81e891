"""Distributed DP under secure aggregation: the Skellam mechanism (Agarwal, Kairouz & Liu, "The
Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021).

Each site clips its whole update to L2 norm C, scales it by s, rounds it to integers with
conditional randomised rounding (Kairouz, Liu & Steinke, ICML 2021: resampled until the rounded norm
is within ``rounded_l2``), and adds Skellam noise of variance mu / (t - 1) per coordinate. Skellam is
closed under addition, so the masked sum of at least t sites carries Skellam noise of variance at
least mu, even without the one site an adjacent run leaves out: client-level DP (one whole site
added or removed) with no trusted coordinator, accounted here for the planned minimum t.

Hand-written: neither Opacus nor Flower has a Skellam mechanism or accountant. The RDP bound is
the paper's Corollary 3.6 in its variance form (as google-research/federated's distributed_dp
``accounting_utils._skellam_rdp`` computes it at scale 1); RDP converts to (eps, delta) with
Opacus' ``get_privacy_spent``. No amplification by sampling: the coordinator, not a secret, picks
the sites.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent

ORDERS = tuple(range(2, 129)) + (256, 512, 1024)


class DdpError(ValueError):
    """A distributed-DP parameter is out of range; the message names it."""


def rounded_l2(norm: float, dim: int, beta: float = math.exp(-0.5)) -> float:
    """L2 bound after conditional randomised rounding of a vector of norm <= ``norm`` in ``dim``
    dimensions (Kairouz, Liu & Steinke 2021, Theorem 4.2's bound; ``beta``: the chance one draw
    exceeds it, so the expected number of draws is 1 / (1 - beta))."""
    if not 0 <= beta < 1:
        raise DdpError(f"beta={beta!r}: must be in [0, 1)")
    bound = norm + math.sqrt(dim)
    if beta > 0:
        bound = min(bound, math.sqrt(norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)))
    return bound


def skellam_rdp(order: int, *, l1: float, l2: float, variance: float) -> float:
    """RDP at integer ``order`` of integer vectors with L1/L2 sensitivities ``l1``/``l2`` under
    Skellam noise of ``variance`` per coordinate (Agarwal et al. 2021, Corollary 3.6)."""
    if order < 2 or variance <= 0:
        raise DdpError(f"order={order}, variance={variance}: need an integer order >= 2 and variance > 0")
    a, mu = order, variance
    return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def sensitivities(*, clip: float, scale: float, dim: int) -> tuple[float, float]:
    """(L1, L2) sensitivity of one site's rounded, scaled, clipped update: removing the site removes
    its integer vector x, with ||x||_2 <= rounded_l2 and ||x||_1 <= min(sqrt(d) ||x||_2, ||x||_2^2)."""
    l2 = rounded_l2(clip * scale, dim)
    return min(math.sqrt(dim) * l2, l2**2), l2


def epsilon(*, releases: Sequence[float], clip: float, scale: float, dim: int, delta: float) -> float:
    """(eps, delta) of the composition of releases, each with the given total noise variance."""
    if not releases:
        return 0.0
    l1, l2 = sensitivities(clip=clip, scale=scale, dim=dim)
    rdp = [sum(skellam_rdp(a, l1=l1, l2=l2, variance=v) for v in releases) for a in ORDERS]
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def calibrate_variance(*, target_epsilon: float, delta: float, rounds: int, clip: float, scale: float,
                       dim: int) -> float:
    """The smallest total variance (per coordinate, in integer units) whose ``rounds`` releases stay
    within ``target_epsilon`` (bisection on a log scale, to 0.1 %)."""
    if not target_epsilon > 0 or rounds < 1:
        raise DdpError(f"target_epsilon={target_epsilon!r}, rounds={rounds!r}: need eps > 0 and rounds >= 1")
    lo, hi = 1e-6, 1.0
    while epsilon(releases=[hi] * rounds, clip=clip, scale=scale, dim=dim, delta=delta) > target_epsilon:
        lo, hi = hi, hi * 4
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if epsilon(releases=[mid] * rounds, clip=clip, scale=scale, dim=dim, delta=delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def skellam(shape: int | tuple[int, ...], variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise: Poisson(variance / 2) - Poisson(variance / 2), int64."""
    if variance <= 0:
        return np.zeros(shape, dtype=np.int64)
    return rng.poisson(variance / 2, size=shape).astype(np.int64) - rng.poisson(variance / 2, size=shape)


def encode_private(x: np.ndarray, *, clip: float, scale: float, local_variance: float, rng: np.random.Generator,
                   max_draws: int = 1000) -> np.ndarray:
    """One site's share of a distributed-DP release: clip to ``clip``, scale, round conditionally
    (redrawn until within ``rounded_l2``), add Skellam(``local_variance``); int64."""
    v = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    v = v * (min(1.0, clip / norm) if norm > 0 else 1.0) * scale
    bound = rounded_l2(clip * scale, v.size)
    floor = np.floor(v)
    for _ in range(max_draws):
        r = floor + (rng.random(v.size) < (v - floor))
        if np.linalg.norm(r) <= bound:
            return r.astype(np.int64) + skellam(v.size, local_variance, rng)
    raise DdpError(f"rounding: no draw within the bound {bound:.4g} in {max_draws} tries")


def scale_for(*, clip: float, dim: int) -> float:
    """The fixed-point scale every site of a round uses: a power of two with s * C >= 16 sqrt(d), so
    rounding adds ~0.1 % to the L2 sensitivity (``rounded_l2``). Public: it depends on C and d only."""
    return float(2 ** math.ceil(math.log2(16 * math.sqrt(dim) / clip)))


@dataclass(frozen=True)
class DdpPlan:
    """Distributed client-level DP for a run: the noise in the sum has std ``noise_multiplier * clip``
    (as central client-dp's), shared among the t - 1 sites that must survive besides any one."""

    noise_multiplier: float
    clip: float
    delta: float
    max_epsilon: float = 0.0  # 0: no limit

    def total_variance(self, dim: int) -> float:
        """Per-coordinate variance of the noise in the sum, in integer units."""
        return (self.noise_multiplier * self.clip * scale_for(clip=self.clip, dim=dim)) ** 2

    def local_variance(self, dim: int, threshold: int) -> float:
        if threshold < 2:
            raise DdpError(f"threshold={threshold}: distributed DP needs at least 2 surviving sites")
        return self.total_variance(dim) / (threshold - 1)

    def epsilon(self, releases: int, dim: int) -> float:
        return epsilon(releases=[self.total_variance(dim)] * releases, clip=self.clip,
                       scale=scale_for(clip=self.clip, dim=dim), dim=dim, delta=self.delta)
