"""Heterogeneous-rank merge rules against an independent dense reference (float64)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.aggregation.hetero import (
    RankMergeError,
    create_rank_merge,
    frozen_a,
    lora_scaling,
    project,
    rank_merges,
    stack,
    svd,
    zero_pad,
)

D_OUT, D_IN = 24, 20
RANKS = [2, 4, 8]


def _sites(ranks=RANKS, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, D_IN, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(D_OUT, r, generator=g, dtype=torch.float64) for r in ranks]
    return As, Bs


def _dense(As, Bs, scalings, weights):
    """The merged update the rules approximate: Σ p_k s_k B_k A_k, computed densely."""
    total = sum(weights)
    return sum((w / total) * s * (b @ a) for a, b, s, w in zip(As, Bs, scalings, weights))


@pytest.mark.parametrize("rslora", [False, True])
def test_svd_is_the_best_rank_r_approximation_eckart_young(rslora):
    # Prepare: ranks 2, 4, 8 (stacked 14 < 20), alpha 16, sizes as weights
    As, Bs = _sites()
    s = [lora_scaling(16.0, r, rslora=rslora) for r in RANKS]
    w = [30.0, 10.0, 60.0]
    W = _dense(As, Bs, s, w)
    U, S, Vh = torch.linalg.svd(W)
    for r in (2, 4, 8):
        # Execute
        m = svd(As, Bs, s, w, max_rank=8, rank=r)
        # Assert: B·A equals the dense truncated SVD; the dropped energy is the tail's share
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        torch.testing.assert_close(m.B @ m.A, best, rtol=1e-9, atol=1e-9)
        assert m.dropped_energy == pytest.approx(float((S[r:] ** 2).sum() / (S**2).sum()), rel=1e-9)
        # every site's projection is the best rank-r_k approximation too
        for rk in (1, 2):
            a, b = project(m.A, m.B, rk, s[0])
            torch.testing.assert_close(s[0] * b @ a, U[:, :rk] @ torch.diag(S[:rk]) @ Vh[:rk], rtol=1e-9, atol=1e-9)


def test_svd_takes_the_dense_path_when_the_stacked_rank_is_large():
    As, Bs = _sites([8, 8, 8])  # stacked 24 >= min(24, 20)
    m = svd(As, Bs, [1.0] * 3, [1.0] * 3, max_rank=20)
    torch.testing.assert_close(m.B @ m.A, _dense(As, Bs, [1.0] * 3, [1.0] * 3), rtol=1e-9, atol=1e-9)
    assert m.dropped_energy == pytest.approx(0.0, abs=1e-12)


def test_frozen_a_is_exact_and_a_plain_weighted_sum_of_b():
    # Prepare: one shared A of the largest rank; site k uses its first r_k rows
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(8, D_IN, generator=g, dtype=torch.float64)
    As = [shared[:r] for r in RANKS]
    Bs = [torch.randn(D_OUT, r, generator=g, dtype=torch.float64) for r in RANKS]
    s = [lora_scaling(16.0, r, rslora=False) for r in RANKS]
    w = [1.0, 2.0, 1.0]
    # Execute
    m = frozen_a(As, Bs, s, w, max_rank=8, shared_A=shared)
    # Assert
    torch.testing.assert_close(m.B @ m.A, _dense(As, Bs, s, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.A, shared, rtol=0, atol=0)
    expected_B = torch.zeros(D_OUT, 8, dtype=torch.float64)
    for b, sk, wk in zip(Bs, s, w):
        expected_B[:, : b.shape[1]] += wk / 4 * sk * b
    torch.testing.assert_close(m.B, expected_B, rtol=1e-12, atol=1e-12)
    with pytest.raises(RankMergeError, match="site 1: its A is not the shared frozen A"):
        frozen_a(As[:1] + [As[1] + 1] + As[2:], Bs, s, w, max_rank=8, shared_A=shared)


def test_zero_pad_and_stack_match_their_definitions():
    As, Bs = _sites()
    s = [0.5, 2.0, 1.0]
    w = [1.0, 1.0, 2.0]
    zp = zero_pad(As, Bs, s, w, max_rank=8)
    A_ref = sum(wk / 4 * torch.nn.functional.pad(a, (0, 0, 0, 8 - a.shape[0])) for a, wk in zip(As, w))
    B_ref = sum(wk / 4 * sk * torch.nn.functional.pad(b, (0, 8 - b.shape[1])) for b, sk, wk in zip(Bs, s, w))
    torch.testing.assert_close(zp.A, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zp.B, B_ref, rtol=1e-12, atol=1e-12)
    st = stack(As, Bs, s, w)
    assert st.A.shape == (14, D_IN) and st.B.shape == (D_OUT, 14)
    torch.testing.assert_close(st.B @ st.A, _dense(As, Bs, s, w), rtol=1e-12, atol=1e-12)  # exact


def test_equal_ranks_reduce_to_fedavg_where_they_should():
    """frozen_a and zero_pad with equal ranks are FedAvg of the factors (with B scaled); svd at the
    full stacked rank is the FedAvg of the products."""
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    Bs = [torch.randn(D_OUT, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [1.0, 2.0, 3.0]
    zp = zero_pad([shared] * 3, Bs, [2.0] * 3, w, max_rank=4)
    torch.testing.assert_close(zp.B, 2.0 * sum(wk / 6 * b for b, wk in zip(Bs, w)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zp.A, shared, rtol=1e-12, atol=1e-12)
    full = svd([shared] * 3, Bs, [2.0] * 3, w, max_rank=12)
    torch.testing.assert_close(full.B @ full.A, _dense([shared] * 3, Bs, [2.0] * 3, w), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", ["zero_pad", "svd", "stack"])
def test_bad_inputs_are_rejected_with_a_named_error(rule):
    As, Bs = _sites()
    fn = create_rank_merge(rule)
    with pytest.raises(RankMergeError, match=r"weights=\[-1.0"):
        fn(As, Bs, [1.0] * 3, [-1.0, 1.0, 1.0], max_rank=8)
    with pytest.raises(RankMergeError, match="positive sum"):
        fn(As, Bs, [1.0] * 3, [0.0, 0.0, 0.0], max_rank=8)
    with pytest.raises(RankMergeError, match="site 2: rank 8 is above the declared maximum 4"):
        fn(As, Bs, [1.0] * 3, [1.0] * 3, max_rank=4)
    with pytest.raises(RankMergeError, match=r"site 1: A \(4, 20\) and B \(24, 3\) are not a LoRA pair"):
        fn(As, [Bs[0], Bs[1][:, :3], Bs[2]], [1.0] * 3, [1.0] * 3, max_rank=8)
    assert rule in rank_merges()
