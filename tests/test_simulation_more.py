"""End to end in Flower's Simulation Engine (Ray), the runs that need no reference run: mixed
ranks; crashing sites and malformed site data (one run). A file of their own so the suite's two workers share the
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


def test_mixed_ranks_run_through_flower_and_export(tmp_path):
    """The hetero path through the real ClientApp/ServerApp: sites train ranks 2, 4, 8 (cycling),
    the server merges by SVD, metrics say who trained which rank, the adapter loads in PEFT. Without
    DP: two DP steps over 100 notes at eps=8 learn nothing reliably (a Zen 4's bfloat16 kernels read
    0.185 before and after, where the Xeon's read a gain), and the path under test is the merge."""
    flat = simulation_config("smoke", [f"dp=false lora-ranks='2,4,8' merge='svd' local-epochs=1 {ONE_WORKER} "
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


def test_crashing_sites_and_a_site_with_malformed_data_are_survived_reported_and_accounted(tmp_path):
    """One run, two kinds of failing site (each end-to-end run pays Ray's start and the ML stack's
    import, so they share one): per-site CSV files, site 3's with a label no site agreed on, and
    fault-crash=0.3 over 3 rounds (site 1 crashes after a DP step in round 3)."""
    import csv

    from fedpeft.data.notes import LABELS, generate_notes
    from fedpeft.faults import crashes
    from fedpeft.privacy.accountant import PrivacyState
    from fedpeft.privacy.audit.checks import audit_run, empirical_audit

    # Prepare
    for site in (0, 1, 2):
        texts, ys = generate_notes(n=150, seed=site)
        with open(tmp_path / f"site{site}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows((t, LABELS[y]) for t, y in zip(texts, ys))
    (tmp_path / "site3.csv").write_text("text,label\nchest pain,oncology\n")
    out = tmp_path / "out"
    flat = simulation_config("smoke", [f"data='{tmp_path}/site{{site}}.csv'", f"labels='{','.join(LABELS)}'",
                                       "num-sites=4 dp-noise='seeded' fault-crash=0.3 num-server-rounds=3 "
                                       f"audit-canaries=500 local-epochs=1 {ONE_WORKER}"], str(out))
    cfg = from_run_config(flat)
    assert [[s for s in range(3) if crashes(cfg, s, r)] for r in (1, 2, 3)] == [[], [], [1]]
    # Execute
    metrics = simulate(flat)
    # Assert: the run completes; crashes are recorded per round; a round is never merged from too few;
    # site 3's error names the site, its file and the field, every round, and it is never merged
    failures = [f["reason"] for r in metrics["rounds"][1:] for f in r["failures"]]
    crashed = [f for f in failures if "unknown label 'oncology'" not in f]  # reasons are shortened to ~600 chars
    assert len(crashed) == 1 and "site 1: injected crash in round 3" in crashed[0], crashed
    assert len(failures) - len(crashed) == 3  # site 3's, once a round
    for r in metrics["rounds"][1:]:
        assert r["skipped"] or len(r["merged"]) >= 2
        assert "3" not in r["merged"]
        assert any("site 3: cannot load data" in x and "site3.csv" in x and "oncology" in x for x in r["rejected"])
    assert sorted(metrics["rounds"][3]["merged"], key=int) == ["0", "2"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # every site's epsilon is exactly that of the steps it took (crashed rounds included): the
    # signed ledger (server copy) and the site's own state agree, and the audit recomputes it
    res = audit_run(out)
    empirical_audit(res)  # the canaries that ran inside the sites' training, through Flower
    assert res.ok, res.failures
    assert res.empirical["kinds"] == ["in-training"]
    for s in range(3):
        state = PrivacyState.from_json((out / "sites" / f"site-{s}" / f"privacy-site{s}.json").read_text())
        assert res.sites[s].steps == state.steps_taken
        assert res.sites[s].claimed_epsilon == pytest.approx(state.epsilon(), rel=1e-9)
