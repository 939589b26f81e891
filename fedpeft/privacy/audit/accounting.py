"""The audit's second accountant: Google's ``dp_accounting`` (a separate implementation from the
Opacus accountant training uses), RDP with its own order grid, plus its PLD accountant (a tighter,
different method) for information.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import logging as absl_logging
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedpeft.privacy.events import composed, history_of

# Two implementations of the same RDP bound differ only by their order grids: Opacus' and
# dp_accounting's agree to ~1e-3 relative on the published cases (tests/test_audit_math.py).
RDP_TOLERANCE = 0.02
# dp_accounting warns (through absl) for every RDP order it drops at large q; the result is still a
# valid upper bound, and the report states the accountant.
absl_logging.set_verbosity(absl_logging.ERROR)


def epsilon_rdp(history: Sequence[Sequence[float]], delta: float) -> float:
    """Epsilon of a composition of DP-SGD events (Poisson-sampled Gaussian steps), RDP."""
    events = history_of(history)
    if not any(e.steps > 0 for e in events):
        return 0.0
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(composed(events))
    return float(acc.get_epsilon(delta))


def epsilon_pld(history: Sequence[Sequence[float]], delta: float,
                discretization: float = 1e-3) -> float:
    """The same composition with privacy loss distributions (tighter than RDP, never looser)."""
    events = history_of(history)
    if not any(e.steps > 0 for e in events):
        return 0.0
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    acc.compose(composed(events))
    return float(acc.get_epsilon(delta))
