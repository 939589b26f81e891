"""Client-level DP (optional): the server clips each site's whole delta to norm C, sums them, adds
Gaussian noise of std σ·C and divides by the number of sites asked (McMahan et al. 2018, DP-FedAvg,
fixed clipping). Neighbouring relation: one whole site added or removed.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` does the same on full models, but it clips
before fedpeft's reply validation and ledger check (so the signed delta hash no longer matches)
and its accounted mode needs an unmodified ``FedAvg.aggregate_train``; fedpeft therefore does the
clip and noise here, after validation, and uses Flower's ``RdpAccountant`` (no amplification:
sites are not Poisson-sampled) for ε. Each release is a ``client-dp`` entry in the server's own
signed ledger (``DIR/ledger/server.jsonl``); noise is seeded from the server's OS entropy.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedpeft.aggregation.fedavg import weighted_sum
from fedpeft.io import atomic_write_bytes
from fedpeft.privacy.ledger import Ledger, delta_hash, load_or_create_key, public_pem

Tensors = dict[str, torch.Tensor]
SERVER = "server"


class ClientBudgetExhausted(RuntimeError):
    """Another client-level release would exceed client-dp-max-epsilon: the round is skipped."""


def clip_delta(delta: Tensors, clip: float) -> tuple[Tensors, float]:
    """``delta`` scaled to L2 norm at most ``clip`` (over all its tensors); returns (clipped, norm)."""
    norm = float(torch.sqrt(torch.stack([(t.double() ** 2).sum() for t in delta.values()]).sum()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: t * factor for k, t in delta.items()}, norm


def noised_mean(deltas: Sequence[Tensors], *, clip: float, noise_multiplier: float, num_sampled: int,
                generator: torch.Generator) -> Tensors:
    """(Σ clip(Δ_k) + N(0, (σC)²)) / num_sampled, per coordinate: sensitivity C/num_sampled."""
    if num_sampled < max(1, len(deltas)):
        raise ValueError(f"num_sampled={num_sampled}: fewer than the {len(deltas)} deltas merged")
    clipped = [clip_delta(d, clip)[0] for d in deltas]
    out: Tensors = {}
    for k in clipped[0]:
        acc = weighted_sum([c[k] for c in clipped], [1.0] * len(clipped))
        acc += torch.normal(0.0, noise_multiplier * clip, size=acc.shape, generator=generator, dtype=torch.float64)
        out[k] = (acc / num_sampled).to(clipped[0][k].dtype)
    return out


class ClientLevelDP:
    """The server's client-level mechanism, its accountant (Flower's) and its signed ledger."""

    def __init__(self, *, out_dir: str | Path, noise_multiplier: float, clip: float, delta: float,
                 population: int, max_epsilon: float = 0.0) -> None:
        self.noise_multiplier, self.clip, self.delta = noise_multiplier, clip, delta
        self.max_epsilon = max_epsilon or None
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=population, max_epsilon=self.max_epsilon,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        out = Path(out_dir)
        key = load_or_create_key(out / "server-key.pem")
        pub = out / "ledger" / f"{SERVER}.pub"
        if not pub.exists():
            atomic_write_bytes(pub, public_pem(key).encode())
        self.ledger = Ledger(out / "ledger" / f"{SERVER}.jsonl", key, site=SERVER)  # type: ignore[arg-type]

    def release(self, server_round: int, deltas: Sequence[Tensors], *, num_sampled: int) -> Tensors:
        """Check the budget, clip, noise and average; compose the release and sign its entry."""
        event = GaussianPrivacyEvent(noise_multiplier=self.noise_multiplier, sample_size=num_sampled,
                                     population_size=max(num_sampled, self.accountant.config.population_size))
        if self.max_epsilon is not None and self.accountant.would_exceed(event):
            raise ClientBudgetExhausted(
                f"client-dp-max-epsilon={self.max_epsilon:g}: round {server_round} would exceed it "
                f"(spent {self.accountant.get_epsilon(self.delta):.4f}); no release")
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        merged = noised_mean(deltas, clip=self.clip, noise_multiplier=self.noise_multiplier,
                             num_sampled=num_sampled, generator=gen)
        self.accountant.compose(event)
        self.ledger.append("client-dp", {
            "round": server_round, "sigma": self.noise_multiplier, "clip": self.clip, "sites_sampled": num_sampled,
            "sites_merged": len(deltas), "delta": self.delta, "sample_rate": 1.0, "steps": 1,
            "accountant": "flwr RdpAccountant (no amplification)", "noise": "secret",
            "epsilon_after": self.accountant.get_epsilon(self.delta),
            "target_epsilon": self.max_epsilon,  # None: no limit set
            "adjacency": "add/remove one whole site", "merged_sha256": delta_hash(merged),
        })
        return merged
