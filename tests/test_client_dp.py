"""Client-level DP on the server: clipping and noise against hand-computed values, Flower's accountant
against Opacus', the server's signed ledger in `fedpeft audit`, and the budget stop."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.privacy.accountant import compute_epsilon
from fedpeft.privacy.audit.checks import audit_run
from fedpeft.privacy.client_dp import ClientBudgetExhausted, ClientLevelDP, clip_delta, noised_mean


def test_clip_scales_the_whole_delta_to_the_norm():
    # Prepare: norm of (3, 4) and (12,) = 13
    d = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0])}
    # Execute
    clipped, norm = clip_delta(d, 6.5)
    small, _ = clip_delta(d, 100.0)
    # Assert
    assert norm == pytest.approx(13.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([1.5, 2.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(clipped["b"], torch.tensor([6.0]), rtol=0, atol=1e-6)
    assert torch.equal(small["a"], d["a"])


def test_noised_mean_is_the_clipped_sum_over_sampled_plus_noise_of_std_sigma_c_over_n():
    # Prepare: two deltas, 4 sites asked (one declined, one rejected): divide by 4, not 2
    d1 = {"w": torch.full((200_000,), 0.01)}  # norm ~4.47 -> clipped to 1
    d2 = {"w": torch.zeros(200_000)}
    gen = torch.Generator().manual_seed(0)
    # Execute
    exact = noised_mean([d1, d2], clip=1.0, noise_multiplier=1e-12, num_sampled=4, generator=gen)
    noisy = noised_mean([d1, d2], clip=1.0, noise_multiplier=2.0, num_sampled=4, generator=gen)
    # Assert: the exact part, then the noise's empirical std (200,000 draws: 1 % tolerance)
    expected = d1["w"] / float(torch.linalg.vector_norm(d1["w"])) / 4
    torch.testing.assert_close(exact["w"], expected, rtol=1e-4, atol=1e-9)  # float32 vs float64 norm
    assert float((noisy["w"] - expected).std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.01)


def test_release_accounts_with_flower_signs_the_ledger_and_stops_at_the_budget(tmp_path):
    # Prepare: sigma 1.5, budget 3 at delta 1e-5
    dp = ClientLevelDP(out_dir=tmp_path, noise_multiplier=1.5, clip=0.5, delta=1e-5, population=3, max_epsilon=3.0)
    deltas = [{"w": torch.randn(10)} for _ in range(3)]
    # Execute: release until the budget stops it
    released = 0
    with pytest.raises(ClientBudgetExhausted, match="client-dp-max-epsilon=3"):
        for rnd in range(1, 50):
            dp.release(rnd, deltas, num_sampled=3)
            released += 1
    # Assert: Flower's RDP (dp_accounting) ~ Opacus' RDP for `released` Gaussian releases; within budget
    eps = dp.accountant.get_epsilon(1e-5)
    assert eps == pytest.approx(compute_epsilon(history=[(1.5, 1.0, released)], delta=1e-5), rel=0.02)
    assert 0 < eps <= 3.0 and released >= 1
    lines = (tmp_path / "ledger" / "server.jsonl").read_text().splitlines()
    assert len(lines) == 1 + released and json.loads(lines[-1])["adjacency"] == "add/remove one whole site"
    # the audit verifies and recomputes it; an edit is caught
    res = audit_run(tmp_path)
    assert res.ok, res.failures
    assert res.client_level["releases"] == released and "whole site" in res.to_json()["statement"]
    lines[1] = lines[1].replace('"sigma":1.5', '"sigma":3.0')
    (tmp_path / "ledger" / "server.jsonl").write_text("\n".join(lines) + "\n")
    assert any("server: entry 1 (line 2): signature does not verify" in f for f in audit_run(tmp_path).failures)


def test_strategy_applies_client_dp_after_validation(tmp_path):
    """Through the Flower strategy: the merged update is the noised mean of the clipped deltas."""
    from fedpeft.config import FederationConfig, PrivacyConfig, RunConfig
    from fedpeft.federation import from_arrays
    from fedpeft.strategy import make_strategy
    from tests.test_aggregation import GLOBAL, _reply

    # Prepare: record-level DP off (no site ledgers needed), client-level on with almost no noise
    cfg = RunConfig(federation=FederationConfig(num_sites=2, min_train_sites=1, out_dir=str(tmp_path)),
                    privacy=PrivacyConfig(enabled=False, client_dp=True, client_noise_multiplier=1e-9,
                                          client_clip=1.0))
    strategy = make_strategy(cfg)
    strategy._global = {k: v.clone() for k, v in GLOBAL.items()}
    strategy._log(1).sent = 2
    big = {"a.lora_A.weight": torch.full((2, 3), 10.0), "head.bias": torch.zeros(2)}
    bad = {"a.lora_A.weight": torch.full((2, 3), float("nan")), "head.bias": torch.zeros(2)}
    # Execute: a NaN reply is rejected before clipping; the other is clipped to norm 1, divided by 2 sent
    arrays, _ = strategy.aggregate_train(1, [_reply(big, site=0, node=1), _reply(bad, site=1, node=2)])
    # Assert
    new = from_arrays(arrays)
    assert float(torch.linalg.vector_norm(new["a.lora_A.weight"])) == pytest.approx(0.5, rel=1e-6)
    assert strategy.rounds[1].client_epsilon > 0 and len(strategy.rounds[1].rejected) == 1
    assert (tmp_path / "ledger" / "server.jsonl").exists()
