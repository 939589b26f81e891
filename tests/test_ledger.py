"""The privacy ledger and `fedpeft audit`: signatures, hash chain, tampering, coverage, budgets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.cli import main
from fedpeft.privacy.accountant import BudgetExceeded, new_privacy_state
from fedpeft.privacy.audit.checks import audit_run
from fedpeft.privacy.audit.statement import privacy_statement
from fedpeft.privacy.ledger import LedgerError, ServerCopies, delta_hash, new_key, public_pem, verify_file
from fedpeft.privacy.vault import SiteVault


def _release(vault: SiteVault, state, rnd: int, steps: int, *, noise: str = "secret", deployed: bool = False):
    """One round's DP release: the state's history grows by ``steps``; the vault signs it."""
    before = type(state)(**{**state.__dict__, "history": list(state.history)})
    state.history.append((state.noise_multiplier, state.sample_rate, steps))
    delta = {"w": torch.full((2, 3), float(rnd + 10 * vault.site))}
    vault.record_release(server_round=rnd, before=before, after=state, delta=delta, noise=noise, deployed=deployed)
    return delta


def make_run(tmp_path: Path, *, sites: int = 2, rounds: int = 3, noise: str = "secret", deployed: bool = False,
             accountant: str = "rdp") -> Path:
    """A run folder as a simulation leaves it: site folders, server ledger copies, checkpoints and
    the merged-delta hashes in metrics.json (no training: the ledger does not depend on it)."""
    run = tmp_path / "run"
    copies = ServerCopies(run / "ledger")
    rows = [{"round": 0}]
    states = {s: new_privacy_state(target_epsilon=4.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=0.25,
                                   planned_steps=4 * rounds, accountant=accountant) for s in range(sites)}
    for rnd in range(1, rounds + 1):
        merged = {}
        for s in range(sites):
            vault = SiteVault(run / "sites" / f"site-{s}", s)
            delta = _release(vault, states[s], rnd, 4, noise=noise, deployed=deployed)
            copies.accept(site=s, data=vault.ledger_bytes(), public_key=vault.public_key(), server_round=rnd,
                          delta_sha256=delta_hash(delta))
            merged[str(s)] = delta_hash(delta)
        rows.append({"round": rnd, "merged": merged, "skipped": False})
    for rnd in range(rounds + 1):
        (run / "checkpoints" / f"round-{rnd:03d}").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"rounds": rows}))
    return run


def test_honest_run_passes_and_epsilon_matches_the_second_accountant(tmp_path):
    # Prepare
    run = make_run(tmp_path)
    # Execute
    res = audit_run(run)
    # Assert: verified, no failures; Opacus' epsilon (claimed) within 2 % of dp_accounting's RDP,
    # and the PLD accountant (tighter) never above it
    assert res.ok, res.failures
    for a in res.sites.values():
        assert a.verified and a.releases == 3 and a.steps == 12
        assert a.epsilon_rdp == pytest.approx(a.claimed_epsilon, rel=0.02)
        assert 0 < a.epsilon_pld <= a.epsilon_rdp * 1.001
        assert a.claimed_epsilon <= 4.0


def test_a_run_accounted_with_prv_is_recomputed_with_the_pld_accountant_and_passes(tmp_path):
    # Prepare: sites that calibrated and accounted with Opacus' PRV accountant (tighter than RDP)
    run = make_run(tmp_path, accountant="prv")
    # Execute
    res = audit_run(run)
    # Assert: RDP would overstate this claim by ~10 %, so the audit recomputes with dp_accounting's
    # PLD accountant (the same exact privacy curve, a separate implementation) and the claim stands
    assert res.ok, res.failures
    for a in res.sites.values():
        assert a.accountant == "prv"
        assert a.epsilon_rdp > a.claimed_epsilon * 1.03
        assert a.epsilon_recomputed == a.epsilon_pld == pytest.approx(a.claimed_epsilon, abs=0.02)
        assert a.claimed_epsilon <= 4.0
    assert "PRV accountant (recomputed with PLD)" in privacy_statement(res)


def test_cli_writes_every_report_and_exit_code(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["audit", str(run)]) == 0
    for name in ("report.md", "report.html", "report.json", "epsilon.png"):
        assert (run / "audit" / name).stat().st_size > 300
    report = json.loads((run / "audit" / "report.json").read_text())
    assert report["ok"] and "one record" in report["statement"]
    # a tampered copy: non-zero exit, the failure named on stdout
    path = run / "ledger" / "site-1.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"steps":4', b'"steps":1', 1))
    assert main(["audit", str(run)]) == 1
    assert "site 1: entry 1" in capsys.readouterr().out


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(ln + b"\n" for ln in lines))


@pytest.mark.parametrize("tamper, expected", [
    ("edit", r"site 0: entry 2 \(line 3\): signature does not verify"),
    ("delete", r"site 0: entry 2 \(line 3\): seq=3, expected 2"),
    ("reorder", r"site 0: entry 1 \(line 2\): seq=2, expected 1"),
    ("wrong-key", r"site 0: entry 0 \(line 1\): the ledger's key is not the site's registered public key"),
    ("torn", r"site 0: entry 3 \(line 4\) is torn"),
])
def test_every_kind_of_tampering_is_detected_and_named(tmp_path, tamper, expected):
    # Prepare: an honest run, then one change to site 0's ledger copy
    run = make_run(tmp_path)
    path = run / "ledger" / "site-0.jsonl"
    lines = _lines(path)
    if tamper == "edit":
        entry = json.loads(lines[2])
        entry["epsilon_after"] = entry["epsilon_after"] / 2  # under-report the spend
        lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        _write(path, lines)
    elif tamper == "delete":
        _write(path, lines[:2] + lines[3:])
    elif tamper == "reorder":
        _write(path, [lines[0], lines[2], lines[1], lines[3]])
    elif tamper == "wrong-key":  # the whole ledger re-signed by someone else's key
        (run / "ledger" / "site-0.pub").write_text(public_pem(new_key()))
    elif tamper == "torn":
        path.write_bytes(path.read_bytes()[:-40])
    # Execute
    res = audit_run(run)
    # Assert
    assert not res.ok
    assert any(__import__("re").search(expected, f) for f in res.failures), res.failures


def test_server_refuses_a_ledger_that_rewrites_history_or_mismatches_the_delta(tmp_path):
    # Prepare
    state = new_privacy_state(target_epsilon=4.0, target_delta=1e-5, max_grad_norm=1.0, sample_rate=0.25,
                              planned_steps=8)
    vault = SiteVault(tmp_path / "site", 0)
    copies = ServerCopies(tmp_path / "ledger")
    delta = _release(vault, state, 1, 4)
    copies.accept(site=0, data=vault.ledger_bytes(), public_key=vault.public_key(), server_round=1,
                  delta_sha256=delta_hash(delta))
    # Execute / Assert: a delta other than the signed one, a stale round, a forged key
    delta2 = _release(vault, state, 2, 4)
    with pytest.raises(LedgerError, match="does not match the signed delta_sha256"):
        copies.accept(site=0, data=vault.ledger_bytes(), public_key=vault.public_key(), server_round=2,
                      delta_sha256=delta_hash({"w": delta2["w"] + 1}))
    with pytest.raises(LedgerError, match="round=2, expected this round 3"):
        copies.accept(site=0, data=vault.ledger_bytes(), public_key=vault.public_key(), server_round=3,
                      delta_sha256=delta_hash(delta2))
    impostor = SiteVault(tmp_path / "impostor", 0)
    _release(impostor, new_privacy_state(target_epsilon=4.0, target_delta=1e-5, max_grad_norm=1.0,
                                         sample_rate=0.25, planned_steps=8), 2, 4)
    with pytest.raises(LedgerError, match="not the site's registered public key"):
        copies.accept(site=0, data=impostor.ledger_bytes(), public_key=impostor.public_key(), server_round=2,
                      delta_sha256=None)
    # the honest reply still goes through, and the copy equals the site's own ledger
    copies.accept(site=0, data=vault.ledger_bytes(), public_key=vault.public_key(), server_round=2,
                  delta_sha256=delta_hash(delta2))
    assert (tmp_path / "ledger" / "site-0.jsonl").read_bytes() == vault.ledger_bytes()
    assert len(verify_file(tmp_path / "ledger" / "site-0.jsonl", site=0).entries) == 3


def test_private_key_is_0600_and_never_overwritten(tmp_path):
    vault = SiteVault(tmp_path / "site", 3)
    _ = vault.ledger  # creates the key and the open entry
    key = tmp_path / "site" / "site-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    from fedpeft.privacy.ledger import save_private_key
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_private_key(new_key(), key)


def test_seeded_noise_on_a_deployed_site_fails_the_audit(tmp_path):
    res = audit_run(make_run(tmp_path, deployed=True, noise="seeded"))
    assert any("dp-noise='seeded' on a deployed site" in f for f in res.failures)
    sim = audit_run(make_run(tmp_path / "sim", noise="seeded"))
    assert sim.ok and any("no protection against the coordinator" in w for w in sim.warnings)


def test_a_checkpoint_without_ledger_coverage_fails(tmp_path):
    run = make_run(tmp_path)
    (run / "checkpoints" / "round-004").mkdir()  # a round nobody signed for
    res = audit_run(run)
    assert any("checkpoint round-004" in f and "not covered" in f for f in res.failures)
    m = json.loads((run / "metrics.json").read_text())
    m["rounds"][2]["merged"]["1"] = "0" * 64  # the server merged a delta site 1 never signed
    (run / "metrics.json").write_text(json.dumps(m))
    shutil.rmtree(run / "checkpoints" / "round-004")
    assert any("round-002: site 1's delta" in f for f in audit_run(run).failures)


@settings(max_examples=8, deadline=None)  # each example calibrates sigma (Opacus' search)
@given(
    target=st.floats(0.5, 10.0), q=st.sampled_from([0.05, 0.1, 0.25, 0.5]),
    steps=st.integers(1, 20), planned_rounds=st.integers(1, 6),
    asks=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=12),
)
def test_spent_epsilon_never_exceeds_the_budget(target, q, steps, planned_rounds, asks):
    """Random plans, participation (dropouts) and restarts (JSON round trips): the budget holds."""
    from fedpeft.privacy.accountant import PrivacyState

    state = new_privacy_state(target_epsilon=target, target_delta=1e-5, max_grad_norm=1.0, sample_rate=q,
                              planned_steps=steps * planned_rounds)
    trained = 0
    for participates, restart in asks:
        if restart:
            state = PrivacyState.from_json(state.to_json())
        if not participates:
            continue
        try:
            state.check_budget(steps)
        except BudgetExceeded:
            continue
        state.history.append((state.noise_multiplier, state.sample_rate, steps))
        trained += 1
        assert state.epsilon() <= target
    # the plan is honoured: a site asked every round trains at least its planned rounds
    if sum(p for p, _ in asks) >= planned_rounds:
        assert trained >= planned_rounds
