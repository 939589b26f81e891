"""Lower bounds on epsilon from one training run, from canary scores.

m canaries are each included (IN) or not (OUT) at random; after training each gets a score
(higher = "looks included"). An auditor guesses IN for the canaries above a threshold; if more
guesses are right than an (epsilon, delta)-DP run allows, epsilon is falsified.

- ``epsilon_one_run``: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run"
  (NeurIPS 2023), Theorem 3.1/Prop. 5.1 p-value, one-sided guesses.
- ``epsilon_one_run_fdp``: Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential Privacy in One
  Run" (ICML 2025), the recursive bound against the Gaussian trade-off curve with a cap.

Reimplemented in numpy/scipy (google-deepmind/jax_privacy ``auditing`` has the reference, in JAX):
thresholds on the convex frontier of (FN, TN) counts, Bonferroni-corrected over them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.optimize
import scipy.stats

_binom = scipy.stats.binom
_norm = scipy.stats.norm


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def one_run_p_value(m: int, n_guess: int, n_correct: int, eps: float, delta: float) -> float:
    """P-value of ``n_correct`` right out of ``n_guess`` guesses over ``m`` canaries under
    (eps, delta)-DP (Steinke et al. 2023, Prop. 5.1)."""
    q = _logistic(eps)
    beta = float(_binom.sf(n_correct - 1, n_guess, q))
    if delta == 0:
        return beta
    i = np.arange(1, n_correct + 1)
    alpha = float(np.max((_binom.sf(n_correct - i - 1, n_guess, q) - beta) / i, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def _largest_falsified(objective: Callable[[float], float], eps_lo: float) -> float:
    """The largest eps >= eps_lo with objective(eps) > 0 (objective decreasing in eps)."""
    if objective(eps_lo) <= 0:
        return eps_lo
    eps_hi = max(1.0, 2 * eps_lo)
    while objective(eps_hi) > 0:
        eps_lo, eps_hi = eps_hi, eps_hi * 2
        if eps_hi > 1e3:
            return eps_hi
    return float(scipy.optimize.brentq(objective, eps_lo, eps_hi, xtol=1e-6))


def _steinke(eps_lo: float, m: int, n_guess: int, n_correct: int, significance: float, delta: float) -> float:
    if one_run_p_value(m, n_guess, n_correct, eps_lo, 0.0) > significance:
        return eps_lo  # not even pure DP is falsified here
    return _largest_falsified(lambda e: significance - one_run_p_value(m, n_guess, n_correct, e, delta), eps_lo)


@functools.lru_cache(maxsize=1024)
def _gaussian_tradeoff_inverse(eps: float, delta: float) -> Callable[[float], float]:
    """x -> Phi(Phi^-1(x) - mu) for the Gaussian mechanism that is exactly (eps, delta)-DP."""
    import dp_accounting

    sigma = dp_accounting.get_sigma_gaussian(eps, delta)
    if sigma == 0:
        return lambda x: float(x == 1.0)
    return lambda x: float(_norm.cdf(_norm.ppf(x) - 1.0 / sigma))


def _fdp(eps_lo: float, m: int, n_guess: int, n_correct: int, significance: float, delta: float) -> float:
    def objective(eps: float) -> float:  # > 0 when the guesses falsify the Gaussian f-DP claim
        inv = _gaussian_tradeoff_inverse(eps, delta)
        r = significance * n_correct / m
        h = significance * (n_guess - n_correct) / m
        for i in range(n_correct - 1, -1, -1):
            h_new = max(h, inv(r))
            if h_new == h:
                break
            r = min(r + (i / (n_guess - i)) * (h_new - h), 1.0)
            h = h_new
        return r + h - n_guess / m

    return _largest_falsified(objective, eps_lo)


def _frontier(points: np.ndarray) -> np.ndarray:
    """Indices of the points on the upper-left convex frontier (sorted by x)."""
    idx = np.arange(len(points))
    while len(idx) > 2:
        d = np.diff(points[idx], axis=0)
        dominated = d[:-1, 1] * d[1:, 0] - d[1:, 1] * d[:-1, 0] <= 0
        if not dominated.any():
            break
        idx = idx[np.r_[True, ~dominated, True]]
    return idx


def _counts(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) of "guess IN above the threshold", on the frontier."""
    thresholds = np.concatenate((np.union1d(in_scores, out_scores), [np.inf]))
    fn = np.searchsorted(np.sort(in_scores), thresholds, side="left")
    tn = np.searchsorted(np.sort(out_scores), thresholds, side="left")
    keep = _frontier(np.stack([fn, tn], axis=1).astype(float))
    return len(in_scores) - fn[keep], len(out_scores) - tn[keep]


def _one_run(in_scores: Sequence[float], out_scores: Sequence[float], significance: float, delta: float,
             bound: Callable[..., float]) -> float:
    ins, outs = np.asarray(in_scores, dtype=float), np.asarray(out_scores, dtype=float)
    if ins.size == 0 or outs.size == 0:
        raise ValueError("in_scores and out_scores must both be non-empty")
    if not 0 < significance < 1:
        raise ValueError(f"significance={significance!r}: must be in (0, 1)")
    if not 0 < delta <= 1:
        raise ValueError(f"delta={delta!r}: must be in (0, 1]")
    tp, fp = _counts(ins, outs)
    m = ins.size + outs.size
    alpha = significance / len(tp)  # Bonferroni over the thresholds tried
    guesses = tp + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_lb = 1.0 - np.where(fp < guesses, scipy.stats.beta.ppf(1 - alpha, fp + 1, guesses - fp), 1.0)
    best, best_q = 0.0, 0.5
    for i in np.argsort(-np.nan_to_num(precision_lb, nan=-1.0)):
        n_guess, n_correct = int(guesses[i]), int(tp[i])
        if n_guess == 0 or n_correct / n_guess <= best_q:
            continue
        eps = bound(best, m, n_guess, n_correct, alpha, delta)
        if eps > best:
            best, best_q = eps, _logistic(eps)
    return float(best)


def epsilon_one_run(in_scores: Sequence[float], out_scores: Sequence[float], *, significance: float = 0.05,
                    delta: float = 1e-5) -> float:
    """Steinke et al. (2023) lower bound on epsilon at confidence 1 - significance."""
    return _one_run(in_scores, out_scores, significance, delta, _steinke)


def epsilon_one_run_fdp(in_scores: Sequence[float], out_scores: Sequence[float], *, significance: float = 0.05,
                        delta: float = 1e-5) -> float:
    """Mahloujifar et al. (2025) f-DP lower bound on epsilon at confidence 1 - significance."""
    return _one_run(in_scores, out_scores, significance, delta, _fdp)
