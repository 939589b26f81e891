"""Privacy state that travels: noise calibrated once for the whole planned training, and the
accountant history ``[(sigma, q, steps)]`` kept so epsilon accumulates across rounds and restarts.

Opacus does the maths (``get_noise_multiplier``, its accountants); this module only keeps the
state explicit and serialisable, which Opacus leaves to the caller.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from fedpeft.io import atomic_write_json
from fedpeft.privacy.events import DpSgdEvent, history_of

SIGMA_CACHE_ENV = "FEDPEFT_SIGMA_CACHE"  # a folder the processes of one simulation share


class PrivacyConfigError(ValueError):
    """A DP parameter is out of range; the message names it and its value."""


class BudgetExceeded(RuntimeError):
    """Taking this round's steps would push the site's epsilon past its budget: the site declines."""


def validate_dp_params(
    *, target_epsilon: float, target_delta: float, max_grad_norm: float, sample_rate: float
) -> None:
    """Refuse settings for which no DP guarantee holds."""
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(f"target_epsilon={target_epsilon!r}: must be a finite number > 0")
    if not 0.0 < target_delta < 1.0:
        raise PrivacyConfigError(f"target_delta={target_delta!r}: must be in (0, 1)")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise PrivacyConfigError(f"max_grad_norm={max_grad_norm!r}: must be > 0")
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyConfigError(f"sample_rate={sample_rate!r}: must be in (0, 1]")


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier (Opacus' search) whose epsilon after ``steps`` stays <= target.

    A pure function of its arguments, so it is memoised: a site calibrates once per plan. With
    ``$FEDPEFT_SIGMA_CACHE`` set (``fedpeft simulate`` sets it), the processes of one simulation
    share the results: Opacus' search takes ~0.5-1 s, and 100,000 sites have only a few dozen
    distinct plans (q and steps depend on a site's batch count alone).
    """
    if steps < 1:
        raise PrivacyConfigError(f"steps={steps!r}: must be >= 1")
    args = {"target_epsilon": target_epsilon, "target_delta": target_delta, "sample_rate": sample_rate,
            "steps": steps, "accountant": accountant}
    path = _sigma_file(args)
    if path is not None:
        try:
            saved = json.loads(path.read_text())
            if saved["args"] == args and isinstance(saved["sigma"], float):
                return saved["sigma"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: calibrate
    with _prv_quiet():
        sigma = float(get_noise_multiplier(**args))
    if path is not None:
        atomic_write_json(path, {"args": args, "sigma": sigma})
    return sigma


def _prv_quiet() -> np.errstate:
    """Opacus' PRV evaluates ``np.log`` on both branches of an ``np.where`` and warns "divide by zero"
    for the branch it then discards: a printed warning per call that is not an event."""
    return np.errstate(divide="ignore")


def _sigma_file(args: dict[str, object]) -> Path | None:
    folder = os.environ.get(SIGMA_CACHE_ENV)
    if not folder:
        return None
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:32]
    return Path(folder) / f"sigma-{key}.json"


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float) -> np.ndarray:
    """Opacus' RDP of one sampled-Gaussian step at its default orders (read-only, memoised).

    Opacus recomputes this series for every ``get_epsilon`` call (~0.5 s per site and round);
    a site's (q, sigma) never changes, so it is computed once and composition is a product.
    """
    rdp = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                              orders=RDPAccountant.DEFAULT_ALPHAS), dtype=float)
    rdp.setflags(write=False)
    return rdp


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[DpSgdEvent, ...], delta: float, accountant: str) -> float:
    if accountant == "rdp":  # the same sums as RDPAccountant.get_privacy_spent, bit for bit
        rdp = sum(_rdp_one_step(e.sample_rate, e.noise_multiplier) * e.steps for e in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = list(history)
    with _prv_quiet():
        return float(acc.get_epsilon(delta=delta))


def compute_epsilon(*, history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a composition of DP-SGD events (``DpSgdEvent``s, or Opacus' triples) (Opacus' value)."""
    if not history:
        return 0.0
    key = tuple(history_of(history))
    return _epsilon(key, float(delta), accountant)


@dataclass
class PrivacyState:
    """Everything needed to continue private training later, anywhere: JSON-serialisable."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    target_epsilon: float
    target_delta: float
    planned_steps: int
    accountant: str = "rdp"
    history: list[DpSgdEvent] = field(default_factory=list)
    round: int = 0  # the last round that spent steps (recovery entries in the ledger name it)

    def with_steps(self, steps: int, server_round: int) -> PrivacyState:
        """This state after ``steps`` more steps at its (sigma, q), merged as Opacus' history does."""
        hist = history_of(self.history)
        if hist and hist[-1].noise_multiplier == self.noise_multiplier and hist[-1].sample_rate == self.sample_rate:
            hist[-1] = hist[-1]._replace(steps=hist[-1].steps + steps)
        else:
            hist.append(DpSgdEvent(self.noise_multiplier, self.sample_rate, steps))
        return PrivacyState(**{**self.__dict__, "history": hist, "round": server_round})

    @property
    def steps_taken(self) -> int:
        return int(sum(e.steps for e in history_of(self.history)))

    def epsilon(self) -> float:
        return compute_epsilon(history=self.history, delta=self.target_delta, accountant=self.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon this site would have spent after ``steps`` more steps at its calibrated (sigma, q)."""
        extra = [DpSgdEvent(self.noise_multiplier, self.sample_rate, int(steps))] if steps > 0 else []
        return compute_epsilon(history=[*self.history, *extra], delta=self.target_delta, accountant=self.accountant)

    def check_budget(self, steps: int) -> float:
        """Raise ``BudgetExceeded`` unless ``steps`` more steps keep epsilon <= target; return the
        epsilon after them. Checked before a round, from the accountant history itself, so it holds
        whatever rounds the site missed, how many restarts it had or how the plan was drawn."""
        eps = self.epsilon_after(steps)
        if eps > self.target_epsilon:
            raise BudgetExceeded(
                f"target-epsilon={self.target_epsilon:g}: {steps} more steps would spend epsilon={eps:.4f} "
                f"(spent {self.epsilon():.4f} in {self.steps_taken} steps); declining this round")
        return eps

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyState:
        data = json.loads(text)
        data["history"] = history_of(data.get("history", []))
        return cls(**data)


def new_privacy_state(
    *, target_epsilon: float, target_delta: float, max_grad_norm: float, sample_rate: float,
    planned_steps: int, accountant: str = "rdp",
) -> PrivacyState:
    """Validate, then calibrate sigma once for all ``planned_steps`` the site will ever take."""
    validate_dp_params(target_epsilon=target_epsilon, target_delta=target_delta,
                       max_grad_norm=max_grad_norm, sample_rate=sample_rate)
    sigma = calibrate_noise(target_epsilon=target_epsilon, target_delta=target_delta,
                            sample_rate=sample_rate, steps=planned_steps, accountant=accountant)
    return PrivacyState(noise_multiplier=sigma, sample_rate=sample_rate, max_grad_norm=max_grad_norm,
                        target_epsilon=target_epsilon, target_delta=target_delta,
                        planned_steps=planned_steps, accountant=accountant)
