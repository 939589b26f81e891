"""White-box gradient canaries through the site's own DP step (Opacus' ``DPOptimizer``).

m canaries, each a gradient of norm C along its own coordinate of an adapter-sized parameter,
are included at random (IN with probability 1/2, fixed before training); every step Poisson-samples
the IN canaries at the site's rate q, and Opacus clips, sums and noises them with the site's σ,
exactly as in training. Scores are each coordinate's total movement; the one-run bounds
(``empirical``) turn the top scores' guesses into a lower bound on ε at 95 % confidence.

This audits the mechanism that the ledger's (σ, q, steps, C) describe — clipping, noise, its
generator, the number of steps — with a canary that is worst case for it (Steinke et al. 2023,
§6 white-box); it does not measure how much a real note leaks through the model (that is lower).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from fedpeft.privacy.audit.empirical import epsilon_one_run, epsilon_one_run_fdp


@dataclass
class CanaryAudit:
    canaries: int
    steps: int
    sigma: float
    sample_rate: float
    epsilon_lower_bound: float  # Steinke et al. 2023
    epsilon_lower_bound_fdp: float  # Mahloujifar et al. 2025
    delta: float


def run_gradient_canaries(*, sigma: float, sample_rate: float, steps: int, max_grad_norm: float = 1.0,
                          canaries: int = 2000, delta: float = 1e-5, seed: int | None = None,
                          clip: bool = True) -> CanaryAudit:
    """Run ``steps`` DP steps over gradient canaries; ``clip=False`` and ``sigma=0`` are the
    deliberately broken mechanisms (canaries of norm 10·C, no noise) the audit must catch."""
    from opacus.optimizers import DPOptimizer

    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    included = torch.rand(canaries, generator=gen) < 0.5
    theta = torch.nn.Parameter(torch.zeros(canaries, dtype=torch.float64))
    expected = max(1, round(sample_rate * int(included.sum())))
    # Broken clipping: gradients of norm 10·C pass whole while the noise stays sigma·C.
    boost = 1.0 if clip else 10.0
    opt = DPOptimizer(torch.optim.SGD([theta], lr=1.0), noise_multiplier=sigma / boost,
                      max_grad_norm=max_grad_norm * boost, expected_batch_size=expected, generator=gen)
    scale = max_grad_norm * boost
    idx_in = torch.nonzero(included).flatten()
    for _ in range(steps):
        batch = idx_in[torch.rand(len(idx_in), generator=gen) < sample_rate]
        grads = torch.zeros(len(batch), canaries, dtype=torch.float64)
        grads[torch.arange(len(batch)), batch] = scale  # ascent direction: IN canaries' coordinates fall
        opt.zero_grad(set_to_none=True)
        theta.grad_sample = grads
        opt.step()
    scores = (-theta.detach()).numpy()
    ins, outs = scores[included.numpy()], scores[~included.numpy()]
    return CanaryAudit(canaries=canaries, steps=steps, sigma=sigma, sample_rate=sample_rate, delta=delta,
                       epsilon_lower_bound=epsilon_one_run(ins, outs, significance=0.05, delta=delta),
                       epsilon_lower_bound_fdp=epsilon_one_run_fdp(ins, outs, significance=0.05, delta=delta))
