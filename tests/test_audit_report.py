"""The audit's trust root, its statement and the report an officer signs: a coordinator-forged
ledger is never an unqualified PASS, and always a FAIL against the sites' own keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.privacy.accountant import compute_epsilon
from fedpeft.privacy.audit.checks import NotARun, audit_run
from fedpeft.privacy.audit.provenance import add_provenance
from fedpeft.privacy.audit.report import write_report
from fedpeft.privacy.audit.statement import privacy_statement
from fedpeft.privacy.ledger import Ledger, fingerprint, new_key, public_pem, verify_file
from fedpeft.privacy.vault import SiteVault
from tests.test_ledger import make_run


def _site_keys(run: Path, out: Path, sites: int = 2) -> Path:
    """What the officer collects from each site out of band (`fedpeft site --fingerprint` writes it)."""
    out.mkdir()
    for s in range(sites):
        (out / f"site-{s}.pub").write_text(SiteVault(run / "sites" / f"site-{s}", s).public_key())
    return out


def _forge(run: Path, site: int = 0) -> None:
    """The coordinator swaps site 0's key for its own and rewrites its ledger: sigma x 2 (less
    noise claimed spent for more), every epsilon recomputed to match, all re-signed."""
    path = run / "ledger" / f"site-{site}.jsonl"
    old = verify_file(path, site=site).entries
    forged = run / "forged.jsonl"
    key = new_key()
    ledger = Ledger(forged, key, site=site)
    history: list[tuple[float, float, int]] = []
    for e in old[1:]:
        fields = {k: v for k, v in e.items() if k not in ("kind", "seq", "prev", "sig", "site", "time")}
        fields["sigma"] = 2 * e["sigma"]
        history.append((fields["sigma"], e["sample_rate"], e["steps"]))
        fields["epsilon_after"] = compute_epsilon(history=history, delta=e["delta"])
        ledger.append(e["kind"], fields)
    path.write_bytes(forged.read_bytes())
    forged.unlink()
    (run / "ledger" / f"site-{site}.pub").write_text(public_pem(key))


def test_a_coordinator_forged_ledger_is_never_a_plain_pass_and_fails_with_the_sites_keys(tmp_path):
    # Prepare
    run = make_run(tmp_path)
    keys = _site_keys(run, tmp_path / "keys")
    honest = audit_run(run, keys_dir=keys)
    _forge(run)
    # Execute
    trusting = audit_run(run)
    checked = audit_run(run, keys_dir=keys)
    # Assert: the forgery is self-consistent (no finding against the coordinator's own copies), so
    # all the audit can say is a qualified pass; against the sites' keys it fails, naming site 0
    assert honest.verdict == "PASS"
    assert trusting.ok and trusting.verdict == "QUALIFIED PASS"
    assert "coordinator's copies" in trusting.trust_root and "coordinator's copies" in privacy_statement(trusting)
    assert checked.verdict == "FAIL"
    assert any(re.search(r"site 0: entry 0 .*not the site's registered public key", f) for f in checked.failures)
    # the fingerprints tell the officer which key each verdict rests on
    assert trusting.sites[0].fingerprint == fingerprint((run / "ledger" / "site-0.pub").read_text())
    assert checked.sites[0].fingerprint == fingerprint((keys / "site-0.pub").read_text())
    assert trusting.sites[0].fingerprint != checked.sites[0].fingerprint
    assert trusting.sites[1].fingerprint == checked.sites[1].fingerprint


def test_the_statement_says_only_what_is_true(tmp_path):
    # Prepare: 2 sites x 3 rounds
    res = audit_run(make_run(tmp_path), keys_dir=_site_keys(tmp_path / "run", tmp_path / "keys"))
    # Execute
    text = privacy_statement(res)
    # Assert: each site composes over its own 3 releases (not 6); record-level, with group privacy;
    # the clear-text metrics are not covered; every checkpoint is
    assert "over its own releases only" in text and "6 signed releases" not in text
    assert "a patient with k notes at one site is protected at about k x epsilon" in text
    assert "Not covered by DP" in text and "every checkpoint" in text
    assert text.startswith("Each of the 2 sites")


def test_a_failing_report_leads_with_the_failure_and_shows_unknowns_as_unknown(tmp_path):
    # Prepare: site 1's public key lost, so its ledger cannot be verified
    run = make_run(tmp_path)
    (run / "ledger" / "site-1.pub").unlink()
    # Execute
    assert main(["audit", str(run)]) == 1
    md = (run / "audit" / "report.md").read_text()
    page = (run / "audit" / "report.html").read_text()
    # Assert
    assert md.index("## Failures") < md.index("## Claim (does NOT stand)") < md.index("## Sites")
    assert "Do not release the adapter" in md and "--keys" in md
    row = next(line for line in md.splitlines() if line.startswith("| 1 |") and "NOT verified" in line)
    assert "unknown" in row and "0.0000" not in row and "nan" not in row
    assert 'class="verdict FAIL"' in page and "`" not in page.split("<body>")[1].replace("<code>", "")


def test_a_passing_report_carries_what_an_officer_signs(tmp_path):
    # Prepare: a run with a released adapter equal to its last checkpoint
    run = make_run(tmp_path)
    for d in (run / "adapter", run / "checkpoints" / "round-003"):
        d.mkdir(exist_ok=True)
        (d / "adapter_model.safetensors").write_bytes(b"weights")
    res = audit_run(run, keys_dir=_site_keys(run, tmp_path / "keys"))
    add_provenance(res)
    # Execute
    out = write_report(res, run / "audit")
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    report = json.loads((out / "report.json").read_text())
    # Assert
    p = report["provenance"]
    assert report["verdict"] == "PASS" and p["adapter_is_last_checkpoint"] and p["last_checkpoint"] == 3
    assert p["versions"]["opacus"] and p["audited_at"] and p["first_ledger_time"] <= p["last_ledger_time"]
    assert p["sites"]["0"]["sigma"] and p["sites"]["0"]["sample_rate"] == [0.25]
    for text in ("## Sign-off", "## Trust root", "SHA256:", "Released adapter sha256", "Kind: a simulation"):
        assert text in md, text
    assert "<th>" in page and "<ul>" in page and "data:image/png;base64," in page and 'class="verdict PASS"' in page
    # a released adapter that is not the last checkpoint fails
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"other")
    add_provenance(res)
    assert any("is not the last checkpoint's" in f for f in res.failures)


def test_audit_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    # Execute / Assert: a clear error, exit 2, and nothing written into the folder
    with pytest.raises(NotARun, match="not a fedpeft run folder"):
        audit_run(tmp_path)
    assert main(["audit", str(tmp_path)]) == 2
    assert "not a fedpeft run folder" in capsys.readouterr().err
    assert not (tmp_path / "audit").exists()


def test_coordinator_register_without_keys_is_an_error(capsys):
    assert main(["coordinator", "register", "--insecure"]) == 2
    assert "give the sites' auth.pub files" in capsys.readouterr().err


def test_a_pass_whose_recomputed_epsilon_tops_the_budget_says_why():
    """clinical-gen's audit read 8.0106 (dp_accounting RDP) for a site whose Opacus claim was 7.9987
    against a budget of 8: within tolerance, so a pass, but the officer is told why the quoted
    figure is above the budget; a site within budget by both gets no such sentence."""
    from fedpeft.privacy.audit.checks import AuditResult, SiteAudit

    # Prepare
    def site(i: int, recomputed: float) -> SiteAudit:
        return SiteAudit(site=i, releases=4, steps=24, target_epsilon=8.0, delta=1e-5, claimed_epsilon=7.9987,
                         epsilon_rdp=recomputed, accountant="rdp", verified=True, noise=["secret"])

    over = AuditResult(run_dir="r", sites={0: site(0, 8.0106), 1: site(1, 7.9978)})
    within = AuditResult(run_dir="r", sites={1: site(1, 7.9978)})
    failed = AuditResult(run_dir="r", sites={0: site(0, 8.0106)}, failures=["site 0: something"])
    # Execute
    text, plain, fail = privacy_statement(over), privacy_statement(within), privacy_statement(failed)
    # Assert
    assert "by at most epsilon = 8.011" in text
    assert "For site(s) 0 the recomputed epsilon is slightly above the site's budget (site 0: 8.0106 " \
           "recomputed, 7.9987 by the site's own accountant, budget 8)" in text
    assert "RDP uses another grid of orders" in text and "quotes the larger" in text
    assert "slightly above" not in plain and "slightly above" not in fail
