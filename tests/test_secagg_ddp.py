"""Distributed DP under secure aggregation end to end (`smoke`, seeded), with a site that drops
after sharing its keys: the survivors' sum is unmasked, each site signs its Skellam share, and the
audit recomputes the client-level epsilon from those signatures."""

from __future__ import annotations

import json
import shutil

import pytest

from fedpeft.cli import simulate, simulation_config
from fedpeft.privacy.audit.checks import audit_run
from tests.conftest import ONE_WORKER

pytestmark = pytest.mark.slow


def test_distributed_dp_with_a_dropped_site_is_signed_unmasked_and_recomputed(tmp_path):
    # Prepare: client-dp under secure aggregation (the sites add Skellam shares; seeded: a simulation),
    # and a third of the sites crash after their first DP step (after stages 1-2) in each round
    run = tmp_path / "run"
    flat = simulation_config("smoke", ["dp-noise='seeded' secure-aggregation=true client-dp=true fault-crash=0.34 "
                                       "client-dp-noise-multiplier=0.8 client-dp-clip=0.5 num-server-rounds=2 local-epochs=1 "
                                       f"notes-per-site=100 {ONE_WORKER}"],
                             str(run))
    # Execute
    metrics = simulate(flat)
    honest = audit_run(run)
    info = json.loads((run / "secagg" / "round-000001" / "round.json").read_text())
    site = info["survivors"][0]
    entry = next(json.loads(x) for x in (run / "ledger" / f"site-{site}.jsonl").read_text().splitlines()
                 if json.loads(x).get("ddp"))
    weak = tmp_path / "weak"
    shutil.copytree(run, weak)
    rec = json.loads((weak / "secagg" / "round-000002" / "round.json").read_text())
    rec["ddp"]["total_variance"] *= 2  # the coordinator claims more noise than the sites signed
    (weak / "secagg" / "round-000002" / "round.json").write_text(json.dumps(rec))
    # Assert: the round merged the two survivors; the dropped site's mask key was reconstructed
    assert not metrics["rounds"][1]["skipped"] and len(info["survivors"]) == 2
    assert info["dropped"]["masked"] == sorted(set(info["participants"]) - set(info["survivors"]))
    assert list(info["mask_keys"]) == [str(s) for s in info["dropped"]["masked"]]
    # each survivor signed its share; t - 1 shares make the planned variance (z * s * C)^2
    share = entry["ddp"]
    assert share["mechanism"] == "skellam" and share["threshold"] == info["threshold"] == 2
    assert share["local_variance"] * (share["threshold"] - 1) == pytest.approx(info["ddp"]["total_variance"], rel=1e-12)
    assert info["ddp"]["total_variance"] == pytest.approx((0.8 * 0.5 * info["ddp"]["scale"]) ** 2, rel=1e-12)
    # the audit recomputes the client-level epsilon from the signatures, and catches an inflated claim
    eps = [r["client_epsilon"] for r in metrics["rounds"][1:]]
    assert 0 < eps[0] < eps[1]
    assert honest.ok, honest.failures
    assert any(f"client-level epsilon {eps[1]:.4f}" in n for n in honest.secure_rounds)
    assert any("below the planned" in f for f in audit_run(weak).failures)
