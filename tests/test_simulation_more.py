"""End to end in Flower's Simulation Engine (Ray), the runs that need no reference run: malformed
site data, mixed ranks, crashing sites. A file of their own so the suite's two workers share the
slow runs (``scripts/test.sh``: pytest-xdist by file)."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel

from fedpeft import models
from fedpeft.cli import simulate, simulation_config
from fedpeft.runconfig import from_run_config
from tests.conftest import ONE_WORKER

pytestmark = pytest.mark.slow


def test_site_with_malformed_data_is_reported_and_the_run_goes_on(tmp_path):
    # Prepare: per-site CSV files; site 1's file has a label no site agreed on
    import csv

    from fedpeft.data.notes import LABELS, generate_notes

    for site in (0, 2):
        texts, ys = generate_notes(n=60, seed=site)
        with open(tmp_path / f"site{site}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows((t, LABELS[y]) for t, y in zip(texts, ys))
    (tmp_path / "site1.csv").write_text("text,label\nchest pain,oncology\n")
    flat = simulation_config("smoke", [f"data='{tmp_path}/site{{site}}.csv'", f"labels='{','.join(LABELS)}'",
                                       "num-server-rounds=1", "min-train-sites=2", ONE_WORKER], str(tmp_path / "out"))
    # Execute
    metrics = simulate(flat)
    # Assert: the round merged sites 0 and 2; site 1's error names the site, its file and the field
    r1 = metrics["rounds"][1]
    assert not r1["skipped"]
    assert {s for s, m in r1["sites"].items() if "epsilon" in m} == {"0", "2"}
    assert any("site 1: cannot load data" in r and "site1.csv" in r and "oncology" in r for r in r1["rejected"])
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_mixed_ranks_run_through_flower_and_export(tmp_path):
    """The hetero path through the real ClientApp/ServerApp: sites train ranks 2, 4, 8 (cycling),
    the server merges by SVD, metrics say who trained which rank, the adapter loads in PEFT."""
    flat = simulation_config("smoke", [f"dp-noise='seeded' lora-ranks='2,4,8' merge='svd' local-epochs=1 {ONE_WORKER} "
                                       "notes-per-site=100"],
                             str(tmp_path))
    metrics = simulate(flat)
    cfg = from_run_config(flat)
    for r in metrics["rounds"][1:]:
        assert r["ranks"] == {"0": 2, "1": 4, "2": 8} and not r["rejected"]
        assert 0 <= r["dropped_energy"] < 0.5
    assert metrics["rounds"][-1]["global"]["accuracy"] > metrics["rounds"][0]["global"]["accuracy"]
    base = models.load_base_model(cfg.model, num_labels=len(cfg.data.label_list), labels=cfg.data.label_list)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert model.peft_config["default"].r == 8
    energy = json.loads((tmp_path / "adapter" / "fedpeft.json").read_text())["dropped-energy"]
    assert len(energy) == 3 and all(0 <= v < 0.5 for v in energy.values())  # q, k, v of the one layer


def test_thirty_percent_of_sites_crashing_every_round_is_survived_and_accounted(tmp_path):
    from fedpeft.privacy.accountant import PrivacyState
    from fedpeft.privacy.audit.checks import audit_run

    # Execute: smoke with fault injection, 3 rounds
    flat = simulation_config("smoke", ["dp-noise='seeded' fault-crash=0.3 num-server-rounds=3 audit-canaries=500 "
                                       f"local-epochs=1 notes-per-site=150 {ONE_WORKER}"],
                             str(tmp_path))
    metrics = simulate(flat)
    # Assert: the run completes; crashes are recorded per round; a round is never merged from too few
    failures = [f for r in metrics["rounds"][1:] for f in r["failures"]]
    assert failures and all("injected crash" in f["reason"] for f in failures)
    for r in metrics["rounds"][1:]:
        assert r["skipped"] or len(r["merged"]) >= 2
    # every site's epsilon is exactly that of the steps it took (crashed rounds included): the
    # signed ledger (server copy) and the site's own state agree, and the audit recomputes it
    res = audit_run(tmp_path)
    from fedpeft.privacy.audit.checks import empirical_audit
    empirical_audit(res)  # the canaries that ran inside the sites' training, through Flower
    assert res.ok, res.failures
    assert res.empirical["kinds"] == ["in-training"]
    for s in range(3):
        state = PrivacyState.from_json((tmp_path / "sites" / f"site-{s}" / f"privacy-site{s}.json").read_text())
        assert res.sites[s].steps == state.steps_taken
        assert res.sites[s].claimed_epsilon == pytest.approx(state.epsilon(), rel=1e-9)


