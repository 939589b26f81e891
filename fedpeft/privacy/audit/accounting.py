"""The audit's second accountant: Google's ``dp_accounting`` (a separate implementation from the
Opacus accountant training uses), RDP with its own order grid, plus its PLD accountant (a tighter,
different method) for information.
"""

from __future__ import annotations

from collections.abc import Sequence

import dp_accounting
from absl import logging as absl_logging
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

# Two implementations of the same RDP bound differ only by their order grids: Opacus' and
# dp_accounting's agree to ~1e-3 relative on the published cases (tests/test_audit_math.py).
RDP_TOLERANCE = 0.02
# dp_accounting warns (through absl) for every RDP order it drops at large q; the result is still a
# valid upper bound, and the report states the accountant.
absl_logging.set_verbosity(absl_logging.ERROR)


def _event(history: Sequence[tuple[float, float, int]]) -> dp_accounting.DpEvent:
    parts = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps))
        for sigma, q, steps in history if steps > 0]
    return dp_accounting.ComposedDpEvent(parts)


def epsilon_rdp(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition of Poisson-sampled Gaussian steps ``[(sigma, q, steps)]``, RDP."""
    if not any(steps > 0 for _, _, steps in history):
        return 0.0
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(_event(history))
    return float(acc.get_epsilon(delta))


def epsilon_pld(history: Sequence[tuple[float, float, int]], delta: float,
                discretization: float = 1e-3) -> float:
    """The same composition with privacy loss distributions (tighter than RDP, never looser)."""
    if not any(steps > 0 for _, _, steps in history):
        return 0.0
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    acc.compose(_event(history))
    return float(acc.get_epsilon(delta))
