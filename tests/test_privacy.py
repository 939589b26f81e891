"""Accountant and calibration against published values; DP clipping against a brute-force loop."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy.accountant import (
    PrivacyConfigError,
    PrivacyState,
    calibrate_noise,
    compute_epsilon,
    new_privacy_state,
    validate_dp_params,
)


def test_rdp_epsilon_matches_opacus_published_value():
    # Source: opacus/tests/accountants_test.py (shared/ORACLES.md): sigma=1.5, q=0.04,
    # 2250 steps (90 epochs), delta=1e-5 -> eps = 7.32911117143
    eps = compute_epsilon(history=[(1.5, 0.04, 2250)], delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.32911117143, rel=1e-6)


def test_rdp_epsilon_matches_tensorflow_privacy_value():
    # Source: TF Privacy compute_dp_sgd_privacy_test.py: n=60000, batch 150, sigma=1.3,
    # 15 epochs, delta=1e-5 -> eps = 0.7242234026109595 (different order grid: ~1e-3 relative)
    q = 150 / 60000
    steps = 15 * 60000 // 150
    eps = compute_epsilon(history=[(1.3, q, steps)], delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(0.7242234026109595, rel=2e-3)


def test_calibration_matches_opacus_published_sigma():
    # Source: opacus/tests (shared/ORACLES.md): target eps=8, delta=1e-5, q=0.04, 90 epochs -> sigma 1.416
    sigma = calibrate_noise(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.04, steps=90 * 25)
    assert sigma == pytest.approx(1.416, abs=5e-4)


@settings(max_examples=6, deadline=None)  # each example is one Opacus sigma search (~3 s on 2 cores)
@given(
    eps=st.floats(0.5, 20.0),
    q=st.floats(0.005, 0.5),
    steps=st.integers(1, 500),
)
def test_calibration_never_overshoots_target(eps: float, q: float, steps: int):
    sigma = calibrate_noise(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps)
    spent = compute_epsilon(history=[(sigma, q, steps)], delta=1e-5)
    assert spent <= eps + 1e-9


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_epsilon=0.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=0.1), "target_epsilon=0.0"),
        (dict(target_epsilon=-1.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=0.1), "target_epsilon=-1.0"),
        (dict(target_epsilon=1.0, target_delta=1.0, max_grad_norm=1.0, sample_rate=0.1), "target_delta=1.0"),
        (dict(target_epsilon=1.0, target_delta=0.0, max_grad_norm=1.0, sample_rate=0.1), "target_delta=0.0"),
        (dict(target_epsilon=1.0, target_delta=1e-5, max_grad_norm=0.0, sample_rate=0.1), "max_grad_norm=0.0"),
        (dict(target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=0.0), "sample_rate=0.0"),
        (dict(target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=1.5), "sample_rate=1.5"),
    ],
)
def test_invalid_dp_settings_are_refused_with_the_value(kwargs, field):
    with pytest.raises(PrivacyConfigError, match=field.replace(".", r"\.")):
        validate_dp_params(**kwargs)


def test_privacy_state_json_round_trip_keeps_epsilon():
    # Prepare
    state = new_privacy_state(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=0.1,
                              planned_steps=100)
    state.history = [(state.noise_multiplier, 0.1, 40)]
    # Execute
    back = PrivacyState.from_json(state.to_json())
    # Assert
    assert back == state
    assert back.epsilon() == pytest.approx(state.epsilon(), rel=0, abs=0)
    assert json.loads(state.to_json())["history"] == [[state.noise_multiplier, 0.1, 40]]


def test_privacy_state_store_round_trip_and_refuses_corrupt_file(tmp_path):
    from fedpeft.privacy.store import load_state_json, save_state_json, state_path

    # Prepare
    state = new_privacy_state(target_epsilon=2.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=0.5,
                              planned_steps=4)
    state.history = [(state.noise_multiplier, 0.5, 2)]
    # Execute / Assert
    assert load_state_json(tmp_path, 3) is None
    save_state_json(tmp_path, 3, state.to_json())
    assert PrivacyState.from_json(load_state_json(tmp_path, 3)) == state
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    state_path(tmp_path, 3).write_text('{"noise_multiplier": 1.0')
    with pytest.raises(ValueError, match="privacy-site3.json: privacy state is unreadable"):
        load_state_json(tmp_path, 3)


@settings(max_examples=25, deadline=None)
@given(history=st.lists(st.tuples(st.floats(0.3, 5.0), st.floats(0.001, 1.0), st.integers(1, 300)),
                        min_size=1, max_size=4),
       delta=st.sampled_from([1e-5, 1e-6, 1e-3]))
def test_memoised_rdp_epsilon_equals_opacus_accountant(history, delta):
    """The memoised composition is Opacus' RDP accountant, bit for bit (an independent call into it)."""
    from opacus.accountants import RDPAccountant

    # Prepare
    reference = RDPAccountant()
    reference.history = list(history)
    # Execute
    ours = compute_epsilon(history=history, delta=delta)
    again = compute_epsilon(history=history, delta=delta)  # served from the cache
    # Assert
    assert ours == again == reference.get_epsilon(delta=delta)


def test_privacy_events_are_immutable_named_and_load_the_old_triples():
    import dataclasses
    import json

    import dp_accounting

    from fedpeft.privacy.accountant import PrivacyState, compute_epsilon
    from fedpeft.privacy.audit.accounting import epsilon_rdp
    from fedpeft.privacy.events import DpSgdEvent

    # Prepare: a state as an earlier fedpeft wrote it, history as bare [sigma, q, steps] lists
    old = {"noise_multiplier": 1.1, "sample_rate": 0.05, "max_grad_norm": 1.0, "target_epsilon": 8.0,
           "target_delta": 1e-5, "planned_steps": 100, "accountant": "rdp", "round": 2,
           "history": [[1.1, 0.05, 40], [1.3, 0.02, 10]]}
    # Execute
    state = PrivacyState.from_json(json.dumps(old))
    ev = state.history[0]
    # Assert: named, typed, immutable; the same JSON back; epsilon equal whichever form is given
    assert ev == DpSgdEvent(noise_multiplier=1.1, sample_rate=0.05, steps=40) and isinstance(ev.steps, int)
    try:
        ev.steps = 3  # type: ignore[misc]
        raise AssertionError("a privacy event must be immutable")
    except AttributeError:
        pass
    assert json.loads(state.to_json())["history"] == old["history"]
    assert compute_epsilon(history=[(1.1, 0.05, 40), (1.3, 0.02, 10)], delta=1e-5) == state.epsilon()
    manual = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 40)
    assert ev.to_dp_event() == manual
    assert epsilon_rdp(state.history, 1e-5) == epsilon_rdp([tuple(e) for e in state.history], 1e-5)
    assert dataclasses.replace(state, history=[]).epsilon() == 0.0


def test_prv_calibration_and_epsilon_print_no_numpy_warnings():
    """Opacus' PRV takes log(1 - q) on a branch it discards; a user choosing accountant='prv' with a
    site that takes its whole data per step (q = 1: a hospital smaller than the batch) must not see
    thousands of "divide by zero" RuntimeWarnings."""
    import warnings

    # Prepare
    args = {"target_epsilon": 7.5, "target_delta": 1e-5, "sample_rate": 1.0, "steps": 5}

    # Execute
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrate_noise.cache_clear()
        sigma = calibrate_noise(**args, accountant="prv")
        eps = compute_epsilon(history=[(sigma, 1.0, 5)], delta=1e-5, accountant="prv")

    # Assert
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert 0 < eps <= 7.5 + 0.02  # Opacus' PRV reports within its eps_error of the curve
