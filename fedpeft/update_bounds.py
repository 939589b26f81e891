"""How far honest DP training can move one adapter coordinate in a round: the server rejects a
reply beyond it before any merge (``ReplyLimits.max_update``).

Hand-written: Flower and Opacus have no such check; the bounds follow from the optimisers' update
rules and Opacus' clipping and noise, for the configuration the run declared.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedpeft.config import RunConfig
from fedpeft.training import expected_sample_rate, steps_per_round

if TYPE_CHECKING:
    from fedpeft.reply import Reply

SLACK = 1.02  # float rounding in the sites' arithmetic (bfloat16 compute, float32 weights)
FALSE_REJECT = 1e-9  # SGD: chance that honest Gaussian noise alone crosses the bound, per reply
MOMENTUM = 0.9  # training._optimizer's SGD momentum


def _steps(cfg: RunConfig, num_examples: int) -> int:
    return steps_per_round(num_examples=num_examples, batch_size=cfg.train.batch_size,
                           local_epochs=cfg.train.local_epochs, local_steps=cfg.train.local_steps)


def _lr(cfg: RunConfig) -> float:
    return cfg.train.lr * max(1.0, cfg.train.adapter_lr_scale)


def adam_update_bound(cfg: RunConfig, num_examples: int) -> float:
    """AdamW: each step moves a coordinate by at most lr·(1-β1)/√(1-β2) (≈ 3.16·lr at the default
    betas), whatever the (clipped, noised) gradient; times the round's steps."""
    beta1, beta2 = 0.9, 0.999
    return SLACK * _steps(cfg, num_examples) * _lr(cfg) * max(1.0, (1 - beta1) / (1 - beta2) ** 0.5)


def sgd_update_bound(cfg: RunConfig, num_examples: int, *, noise_multiplier: float, coordinates: int) -> float:
    """SGD with momentum 0.9 under Opacus: a step's gradient coordinate is (sum of clipped per-sample
    gradients + N(0, σ²C²)) / expected batch. The sum is at most n·C (every note sampled); the noise
    stays below z·σ·C with z set so that all ``coordinates`` x steps draws stay below it but with
    probability FALSE_REJECT. Momentum multiplies step t's reach by (1 - 0.9^t) / 0.1."""
    n = max(1, int(num_examples))
    q = expected_sample_rate(num_examples=n, batch_size=cfg.train.batch_size)
    batch = max(1, int(n * q))  # Opacus' expected_batch_size
    steps = _steps(cfg, n)
    c = cfg.privacy.max_grad_norm
    z = math.sqrt(2.0 * math.log(2.0 * max(1, coordinates) * steps / FALSE_REJECT))
    g_max = c * (n + z * max(0.0, noise_multiplier)) / batch
    reach = sum((1 - MOMENTUM ** t) / (1 - MOMENTUM) for t in range(1, steps + 1))
    return SLACK * _lr(cfg) * g_max * reach


def update_bound(cfg: RunConfig) -> Callable[[Reply], float] | None:
    """The bound for this run's optimiser (DP runs only: without clipping nothing bounds SGD)."""
    if not cfg.privacy.enabled:
        return None
    if cfg.train.optimizer == "adamw":
        adam = functools.lru_cache(maxsize=4096)(functools.partial(adam_update_bound, cfg))
        return lambda reply: adam(reply.num_examples)

    planned: dict[int, float] = {}

    def sgd(reply: Reply) -> float:
        # σ as the reply declares it: the signed ledger entry carries the same σ and the audit
        # recomputes ε from it, so a site that overstates σ to loosen this bound claims an ε it did
        # not spend (the empirical audit's concern). A reply without one gets the run's own plan.
        sigma = reply.metrics.get("noise-multiplier")
        if not sigma:
            if reply.num_examples not in planned:
                planned[reply.num_examples] = _planned_sigma(cfg, reply.num_examples)
            sigma = planned[reply.num_examples]
        coords = sum(t.numel() for t in (reply.delta or {}).values())
        return sgd_update_bound(cfg, reply.num_examples, noise_multiplier=float(sigma), coordinates=coords)
    return sgd


def _planned_sigma(cfg: RunConfig, num_examples: int) -> float:
    from fedpeft.training import plan_privacy

    return plan_privacy(num_examples=num_examples, train=cfg.train, privacy=cfg.privacy,
                        num_rounds=cfg.federation.num_rounds).noise_multiplier
