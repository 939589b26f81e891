"""Differential privacy: Opacus engine setup, noise calibration and serialisable accountant state."""

from fedpeft.privacy.accountant import (
    BudgetExceeded,
    PrivacyState,
    calibrate_noise,
    compute_epsilon,
    new_privacy_state,
    validate_dp_params,
)

__all__ = ["BudgetExceeded", "PrivacyState", "calibrate_noise", "compute_epsilon", "new_privacy_state", "validate_dp_params"]
