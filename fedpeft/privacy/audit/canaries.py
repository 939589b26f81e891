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

import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass

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


@dataclass
class TrainingCanaries:
    """Gradient canaries inside a site's real DP training (``audit-canaries``, simulations).

    Each canary is one coordinate of a LoRA tensor; IN canaries (a secret coin flip each) join
    every batch as records do — Poisson-sampled at the site's rate q — with a per-sample gradient
    of norm C along their coordinate, so Opacus clips and noises them with the real data. After
    each round the canary's score grows by how far the released delta moved its coordinate
    against the canary gradient. Labels and scores stay in the site's folder.
    """

    keys: list[str]  # adapter-state key of each canary's tensor
    index: list[int]  # flat index in that tensor
    included: list[bool]
    scores: list[float]
    seed: int

    @classmethod
    def create(cls, state_shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> TrainingCanaries:
        """``count`` distinct coordinates of the LoRA tensors, chosen and labelled from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        keys = sorted(k for k in state_shapes if ".lora_" in k)
        sizes = torch.tensor([int(torch.tensor(state_shapes[k]).prod()) for k in keys])
        total = int(sizes.sum())
        if count > total:
            raise ValueError(f"audit-canaries={count}: more than the {total} LoRA coordinates")
        flat = torch.randperm(total, generator=g)[:count]
        offsets = torch.cumsum(sizes, 0) - sizes
        which = torch.searchsorted(torch.cumsum(sizes, 0), flat, right=True)
        return cls(keys=[keys[i] for i in which.tolist()], index=(flat - offsets[which]).tolist(),
                   included=(torch.rand(count, generator=g) < 0.5).tolist(), scores=[0.0] * count, seed=seed)

    def hook(self, named: dict[str, torch.nn.Parameter], sample_rate: float, clip: float,
             generator: torch.Generator) -> Callable[[], None]:
        """``before_release`` for ``training.train_local``: append this step's sampled IN canaries'
        per-sample gradients (norm ``clip``, one coordinate each) to every parameter's grad_sample."""
        params = {k: named[_param_name(k, named)] for k in set(self.keys)}
        ins = [i for i, inc in enumerate(self.included) if inc]

        def inject() -> None:
            picked = [i for i in ins if float(torch.rand(1, generator=generator)) < sample_rate]
            if not picked:
                return
            rows = {id(p): torch.zeros((len(picked), *p.shape), dtype=p.dtype, device=p.device)
                    for p in named.values() if p.requires_grad}
            for r, i in enumerate(picked):
                p = params[self.keys[i]]
                rows[id(p)][r].view(-1)[self.index[i]] = clip
            for p in named.values():
                if p.requires_grad and getattr(p, "grad_sample", None) is not None:
                    p.grad_sample = torch.cat([p.grad_sample, rows[id(p)]], dim=0)

        return inject

    def score(self, delta: dict[str, torch.Tensor]) -> None:
        """The round's release moved each canary's coordinate by delta; a canary gradient pushes it down."""
        for i, (k, j) in enumerate(zip(self.keys, self.index)):
            if k in delta:
                self.scores[i] += -float(delta[k].reshape(-1)[j])

    def lower_bounds(self, delta: float) -> tuple[float, float]:
        ins = [s for s, inc in zip(self.scores, self.included) if inc]
        outs = [s for s, inc in zip(self.scores, self.included) if not inc]
        return (epsilon_one_run(ins, outs, significance=0.05, delta=delta),
                epsilon_one_run_fdp(ins, outs, significance=0.05, delta=delta))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainingCanaries:
        return cls(**json.loads(text))


def _param_name(state_key: str, named: dict[str, torch.nn.Parameter]) -> str:
    """peft's parameter name for an adapter-state key: the same name without the adapter name
    (``.default``) and ``modules_to_save``, as peft's state dict writes it (DoRA's magnitude also
    without ``.weight``), among the trainable parameters."""
    if state_key in named:
        return state_key
    matches = [n for n, p in named.items() if p.requires_grad and _state_key_of(n) == _state_key_of(state_key)]
    if len(matches) != 1:
        raise KeyError(f"{state_key}: no such adapter parameter" if not matches else
                       f"{state_key}: ambiguous ({matches[:3]})")
    return matches[0]


def _state_key_of(name: str) -> str:
    key = name.replace(".default", "").replace(".modules_to_save", "")
    return key[: -len(".weight")] if key.endswith("lora_magnitude_vector.weight") else key
