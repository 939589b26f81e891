"""Robust reductions composed with the rank rules (``robust=`` with ``merge=``): hand-computed
medians of padded factors, the dense median's best rank-r approximation, and a poisoned site
among mixed ranks that moves the plain rule far and the robust one hardly at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft import ranks
from fedpeft.aggregation.robust import coordinate_median, coordinate_trimmed_mean
from fedpeft.aggregation.robust_ranks import robust_rank_merge
from fedpeft.config import ConfigError
from fedpeft.factory import initial_adapter_state
from fedpeft.runconfig import from_run_config
from tests.test_hetero_federation import TINY


def test_zero_pad_median_is_the_median_of_the_padded_factors_by_hand():
    # Prepare: ranks 1, 2, 2 of a 2x2 module; scalings 1, 2, 1
    As = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [5.0, 5.0]]), torch.tensor([[0.0, 4.0], [1.0, 1.0]])]
    Bs = [torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[9.0, 9.0], [-9.0, 3.0]])]
    # Execute
    m = robust_rank_merge("zero_pad", coordinate_median, As, Bs, [1.0, 2.0, 1.0], max_rank=2)
    # Assert: A rows padded with zeros (site 0's row 2 is 0): median of {1,3,0}, {2,-1,4}; {0,5,1}, {0,5,1}
    torch.testing.assert_close(m.A, torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=torch.float64))
    # s·B: site 0 [[1,0],[2,0]], site 1 [[2,0],[0,2]], site 2 [[9,9],[-9,3]]
    torch.testing.assert_close(m.B, torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64))


def test_trimmed_mean_by_hand():
    x = torch.tensor([[1.0], [100.0], [2.0], [3.0], [-50.0]], dtype=torch.float64)
    # 5 values, trim 0.2 -> drop one each side: mean of 1, 2, 3
    assert float(coordinate_trimmed_mean(x, 0.2)) == pytest.approx(2.0, abs=1e-12)
    assert float(coordinate_median(x)) == pytest.approx(2.0, abs=1e-12)


def test_svd_median_is_the_best_rank_r_approximation_of_the_dense_median():
    # Prepare: 5 sites, ranks 1..3 of a 6x5 module, random factors
    g = torch.Generator().manual_seed(0)
    rs, sc = [1, 2, 3, 2, 1], [2.0, 1.0, 0.5, 1.0, 2.0]
    As = [torch.randn(r, 5, generator=g, dtype=torch.float64) for r in rs]
    Bs = [torch.randn(6, r, generator=g, dtype=torch.float64) for r in rs]
    # Execute
    m = robust_rank_merge("svd", coordinate_median, As, Bs, sc, max_rank=3)
    # Assert: against numpy, independently: median of the dense updates, then Eckart-Young
    W = np.median(np.stack([s * (b.numpy() @ a.numpy()) for a, b, s in zip(As, Bs, sc)]), axis=0)
    U, S, Vh = np.linalg.svd(W)
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    np.testing.assert_allclose((m.B @ m.A).numpy(), best, rtol=0, atol=1e-10)
    assert m.dropped_energy == pytest.approx(float((S[3:] ** 2).sum() / (S ** 2).sum()), rel=1e-9)


def _locals(cfg, glob, *, poison: float):
    """Five sites' local adapters (ranks cycled 2, 4, 8): a shared update (the signal the sites
    agree on, cut to each site's rank) plus a third as much of their own; site 4 sends ``poison``
    x its update."""
    g = torch.Generator().manual_seed(3)
    top = ranks.start_state(cfg, glob, cfg.adapter.max_rank)
    common = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in top.items()}
    out = []
    for k in range(5):
        r = cfg.adapter.rank_list[k % 3]
        start = ranks.start_state(cfg, glob, r)
        f = poison if k == 4 else 1.0
        local = {}
        for key, v in start.items():
            if cfg.rank_rule == "frozen_a" and key.endswith(ranks.A_SUFFIX):
                local[key] = v
                continue
            c = common[key][tuple(slice(0, n) for n in v.shape)]
            local[key] = v + f * (c + 0.3 * c.std() * torch.randn(v.shape, generator=g))
        out.append((local, r, 10.0))
    return out


def _update(cfg, glob, new):
    """The merged update per LoRA module (B·A at scaling 1) and the head, flattened."""
    parts = [(new[m + ranks.B_SUFFIX].double() @ new[m + ranks.A_SUFFIX].double()
              - glob[m + ranks.B_SUFFIX].double() @ glob[m + ranks.A_SUFFIX].double()).flatten()
             for m in ranks.lora_modules(glob)]
    parts += [(new[k] - glob[k]).double().flatten() for k in glob
              if not (k.endswith(ranks.A_SUFFIX) or k.endswith(ranks.B_SUFFIX))]
    return torch.cat(parts)


@pytest.mark.parametrize("rule, robust", [("zero_pad", "median"), ("frozen_a", "trimmed_mean"),
                                          ("svd", "median"), ("stack", "norm_bound"), ("zero_pad", "norm_bound")])
def test_a_poisoned_site_among_mixed_ranks_moves_the_robust_merge_far_less(rule, robust):
    # Prepare: the honest federation, and the same with site 4 sending 50 x its update
    plain = from_run_config({**TINY, "merge": rule})
    guarded = from_run_config({**TINY, "merge": rule, "robust": robust})
    glob = initial_adapter_state(plain)
    honest, poisoned = _locals(plain, glob, poison=1.0), _locals(plain, glob, poison=50.0)
    # Execute
    shift = {}
    for name, cfg in (("plain", plain), ("robust", guarded)):
        ref = _update(cfg, glob, ranks.merge_states(cfg, glob, honest)[0])
        bad = _update(cfg, glob, ranks.merge_states(cfg, glob, poisoned)[0])
        shift[name] = float((bad - ref).norm() / ref.norm())
    # Assert: the poisoned site drags the plain rule by many times the honest update; the robust
    # composition by less than the honest update itself (under zero_pad and svd the padding zeros
    # of low-rank sites take part in the median, so one site still tips some coordinates)
    assert shift["plain"] > 10.0, shift
    assert shift["robust"] < 1.0 and shift["robust"] < shift["plain"] / 20, shift


@pytest.mark.parametrize("over, message", [
    ({"merge": "stack", "robust": "median"}, "stacked components share no coordinates"),
    ({"merge": "fedavg", "lora-ranks": "", "robust": "median"}, "with equal ranks use merge='median'"),
    ({"merge": "svd", "robust": "mode"}, "robust='mode': must be"),
])
def test_robust_compositions_that_make_no_sense_are_named_errors(over, message):
    with pytest.raises(ConfigError, match=message):
        from_run_config({**TINY, **over})
