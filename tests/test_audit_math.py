"""The audit's maths against published values (shared/ORACLES.md) and against the training accountant."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from fedpeft.privacy.accountant import calibrate_noise, compute_epsilon
from fedpeft.privacy.audit.accounting import epsilon_pld, epsilon_rdp
from fedpeft.privacy.audit.canaries import run_gradient_canaries
from fedpeft.privacy.audit.empirical import epsilon_one_run, epsilon_one_run_fdp, one_run_p_value


def test_second_accountant_matches_published_values():
    # Opacus accountants_test: sigma=1.5, q=0.04, 2250 steps, delta=1e-5 -> 7.32911117143 (its own grid);
    # TF Privacy compute_dp_sgd_privacy_test: n=60000, batch 150, sigma=1.3, 15 epochs -> 0.7242234026109595
    assert epsilon_rdp([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.32911117143, rel=1e-3)
    assert epsilon_rdp([(1.3, 150 / 60000, 6000)], 1e-5) == pytest.approx(0.7242234026109595, rel=1e-3)


@pytest.mark.parametrize("history", [
    [(1.5, 0.04, 2250)], [(0.9, 0.25, 12)] * 5, [(2.0, 0.01, 100), (2.0, 0.01, 300)], [(0.7, 1.0, 3)],
])
def test_second_accountant_agrees_with_opacus_and_pld_is_never_looser(history):
    opacus = compute_epsilon(history=history, delta=1e-5)
    assert epsilon_rdp(history, 1e-5) == pytest.approx(opacus, rel=0.02)
    assert epsilon_pld(history, 1e-5) <= epsilon_rdp(history, 1e-5) * 1.001


def _gaussian_scores(mu: float, n: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    out = scipy.stats.norm.ppf((np.arange(n) + 0.5) / n)  # evenly spaced normal quantiles
    return out + mu, out


@pytest.mark.parametrize("mu, expected", [(0.0, 0.0), (1.0, 1.13346), (2.0, 2.311945)])
def test_steinke_one_run_bound_matches_published_values(mu, expected):
    # jax_privacy auditing tests (shared/ORACLES.md): 10,000 IN / 10,000 OUT, significance 0.05, delta 1e-6
    ins, outs = _gaussian_scores(mu)
    assert epsilon_one_run(ins, outs, significance=0.05, delta=1e-6) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_fdp_one_run_bound_matches_published_value_and_is_tighter():
    ins, outs = _gaussian_scores(1.0)
    fdp = epsilon_one_run_fdp(ins, outs, significance=0.05, delta=1e-6)
    assert fdp == pytest.approx(2.164749, rel=1e-5)
    assert fdp > epsilon_one_run(ins, outs, significance=0.05, delta=1e-6)


def test_all_guesses_right_cap_grows_with_guesses():
    # ORACLES: every guess right, p=0.05: 100 guesses cap the bound near 3.5, 1,000 near 5.8 (the
    # epsilon at which n right guesses out of n reach p = 0.05: logistic(eps)^n = 0.05)
    for n, cap in ((100, 3.5), (1000, 5.8)):
        assert one_run_p_value(n, n, n, cap, 0.0) == pytest.approx(0.05, rel=0.1)
        ins, outs = np.full(n, 10.0), np.zeros(n)  # + Bonferroni and the delta term: a little below the cap
        assert cap - 0.6 < epsilon_one_run(ins, outs, significance=0.05, delta=1e-5) < cap


@pytest.mark.parametrize("eps", [1.0, 8.0])
def test_canary_bound_on_an_honest_dp_step_stays_below_the_claim(eps):
    sigma = calibrate_noise(target_epsilon=eps, target_delta=1e-5, sample_rate=0.34, steps=15)
    audit = run_gradient_canaries(sigma=sigma, sample_rate=0.34, steps=15, seed=1)
    assert 0 <= audit.epsilon_lower_bound <= eps
    assert 0 <= audit.epsilon_lower_bound_fdp <= eps


@pytest.mark.parametrize("broken", ["no-noise", "no-clipping"])
def test_canary_bound_catches_a_broken_run_claiming_epsilon_1(broken):
    sigma = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.34, steps=15)
    audit = run_gradient_canaries(sigma=0.0 if broken == "no-noise" else sigma, sample_rate=0.34, steps=15,
                                  seed=1, clip=broken != "no-clipping")
    assert max(audit.epsilon_lower_bound, audit.epsilon_lower_bound_fdp) >= 3.0


def _canary_run(*, broken: bool, eps: float):
    """Three rounds of one site's real DP training (1-layer MiniLM) with 1,000 canaries inside."""
    from unittest import mock

    from opacus.optimizers import DPOptimizer

    from fedpeft.factory import initial_adapter_state
    from fedpeft.privacy.audit.canaries import TrainingCanaries
    from fedpeft.runconfig import from_run_config
    from fedpeft.site import site_train

    cfg = from_run_config({"model": "minilm", "model-layers": 1, "lora-layers": "0", "notes-per-site": 300,
                           "num-server-rounds": 3, "local-epochs": 2, "batch-size": 64, "dp-noise": "seeded",
                           "optimizer": "sgd", "target-epsilon": eps, "num-sites": 3})
    glob = initial_adapter_state(cfg)
    canaries = TrainingCanaries.create({k: tuple(v.shape) for k, v in glob.items()}, 1000, 7)

    def no_noise(self):  # the deliberate bug: clipped gradients released without noise
        for p in self.params:
            p.grad = p.summed_grad.view_as(p)

    patch = mock.patch.object(DPOptimizer, "add_noise", no_noise) if broken else mock.patch.dict({})
    pj = None
    with patch:
        for rnd in (1, 2, 3):
            d, metrics, pj = site_train(cfg, site=0, num_sites=3, server_round=rnd, global_state=glob,
                                        privacy_json=pj, canaries=canaries)
            glob = {k: glob[k] + d[k] for k in glob}
    return metrics["epsilon"], max(canaries.lower_bounds(1e-5))


@pytest.mark.slow
def test_in_training_canaries_honest_run_stays_below_its_claim():
    claimed, lower = _canary_run(broken=False, eps=8.0)
    assert 0 <= lower <= claimed


@pytest.mark.slow
def test_in_training_canaries_catch_a_run_without_noise_that_claims_epsilon_1():
    claimed, lower = _canary_run(broken=True, eps=1.0)
    assert claimed <= 1.0 and lower >= 3.0
