"""What leaves a site: exactly the adapter delta; bad site data fails naming the site."""

from __future__ import annotations

import pytest
import torch

from fedpeft import adapters
from fedpeft.factory import build_model, initial_adapter_state
from fedpeft.privacy.accountant import PrivacyState
from fedpeft.runconfig import from_run_config
from fedpeft.site import SiteError, site_evaluate, site_train

TINY = {"model": "tiny", "lora-layers": "", "lr": 0.01, "adapter-lr-scale": 1.0, "notes-per-site": 40,
        "test-per-site": 10, "num-server-rounds": 2, "batch-size": 16}


@pytest.mark.parametrize("layers", ["", "1"])  # "1": layer 0 is a frozen prefix, served from the cache
def test_only_adapter_delta_leaves_the_site(layers, device):
    # Prepare
    cfg = from_run_config({**TINY, "lora-layers": layers})
    glob = initial_adapter_state(cfg)
    model = build_model(cfg, dp=True)
    trainable = {n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Execute
    delta, metrics, pjson = site_train(cfg, site=1, num_sites=3, server_round=1, global_state=glob,
                                       privacy_json=None)
    # Assert: keys are exactly the trainable adapter tensors, bytes = params x 4 (fp32)
    assert set(delta) == set(glob) == {k.replace(".modules_to_save", "") for k in trainable}
    assert adapters.state_bytes(delta) == n_trainable * 4 == metrics["bytes-up"]
    assert all(not torch.equal(d, torch.zeros_like(d)) for d in delta.values())
    state = PrivacyState.from_json(pjson)
    assert metrics["epsilon"] == pytest.approx(state.epsilon())
    assert 0 < metrics["epsilon"] < cfg.privacy.target_epsilon


def test_privacy_state_carried_between_rounds_accumulates():
    cfg = from_run_config(TINY)
    glob = initial_adapter_state(cfg)
    _, m1, p1 = site_train(cfg, site=0, num_sites=2, server_round=1, global_state=glob, privacy_json=None)
    _, m2, p2 = site_train(cfg, site=0, num_sites=2, server_round=2, global_state=glob, privacy_json=p1)
    assert m1["epsilon"] < m2["epsilon"] <= cfg.privacy.target_epsilon
    assert PrivacyState.from_json(p2).noise_multiplier == PrivacyState.from_json(p1).noise_multiplier


def test_site_with_malformed_data_fails_naming_the_site(tmp_path):
    (tmp_path / "site0.csv").write_text("text,label\nchest pain,cardiology\n")
    (tmp_path / "site1.csv").write_text("text,label\nchest pain,oncology\n")
    cfg = from_run_config({**TINY, "data": str(tmp_path / "site{site}.csv"), "labels": "cardiology,neurology"})
    glob = initial_adapter_state(cfg)
    with pytest.raises(SiteError, match=r"site 1: cannot load data .*site1.csv.*unknown label 'oncology'"):
        site_train(cfg, site=1, num_sites=2, server_round=1, global_state=glob, privacy_json=None)
    with pytest.raises(SiteError, match=r"site 2: cannot load data .*site2.csv.*file not found"):
        site_evaluate(cfg, site=2, num_sites=3, global_state=glob)


def test_site_declines_past_its_planned_budget_and_signs_both(tmp_path):
    """dp-planned-rounds=1 in a 3-round run: round 1 trains, round 2 declines (explicitly, signed)."""
    from fedpeft.privacy.audit.checks import audit_run  # noqa: F401  (the ledger verifies as the audit does)
    from fedpeft.privacy.ledger import verify_file
    from fedpeft.privacy.vault import SiteVault
    from fedpeft.site import site_round

    # Prepare
    cfg = from_run_config({**TINY, "num-server-rounds": 3, "dp-planned-rounds": 1, "dp-noise": "seeded"})
    glob = initial_adapter_state(cfg)
    vault = SiteVault(tmp_path / "site-0", 0)
    # Execute
    r1 = site_round(cfg, site=0, num_sites=2, server_round=1, global_state=glob, vault=vault)
    r2 = site_round(cfg, site=0, num_sites=2, server_round=2, global_state=glob, vault=vault)
    # Assert: a delta, then a decline carrying no delta; epsilon stays within budget; both signed
    assert r1.status == "trained" and r1.delta is not None
    assert r2.status == "declined" and r2.delta is None and "declining" in r2.reason
    state = PrivacyState.from_json(vault.privacy_json())
    assert state.epsilon() <= cfg.privacy.target_epsilon and state.epsilon() > 0.9 * cfg.privacy.target_epsilon
    entries = verify_file(vault.ledger.path, site=0, trusted_pem=vault.public_key()).entries
    assert [e["kind"] for e in entries] == ["open", "dp-sgd", "declined"]
    assert entries[1]["epsilon_after"] == pytest.approx(state.epsilon()) and entries[1]["noise"] == "seeded"
    assert r2.ledger == vault.ledger_bytes()


def test_overlapping_requests_for_one_site_take_turns_and_chain_one_ledger(tmp_path):
    """A late round-1 request still running when round 2's arrives (another worker, another
    process): the second waits for the site's vault, then chains onto the first's entry."""
    import threading
    import time

    from fedpeft.privacy.ledger import verify_file
    from fedpeft.privacy.vault import SiteVault
    from fedpeft.site import site_round

    # Prepare: rounds 1 and 2 requested at once, each opening the folder afresh as a new ClientApp
    # process would; the test holds the vault first, as a slow earlier request would
    cfg = from_run_config({**TINY, "num-server-rounds": 3, "dp-noise": "seeded"})
    glob = initial_adapter_state(cfg)

    def request(rnd: int) -> None:
        site_round(cfg, site=0, num_sites=2, server_round=rnd, global_state=glob,
                   vault=SiteVault(tmp_path / "site-0", 0))

    held = SiteVault(tmp_path / "site-0", 0)
    threads = [threading.Thread(target=request, args=(r,)) for r in (1, 2)]
    # Execute
    with held.exclusive():
        for t in threads:
            t.start()
        time.sleep(2.0)
        blocked = all(t.is_alive() for t in threads)
    for t in threads:
        t.join(timeout=120)
    # Assert: both waited while the vault was held; the ledger is one valid chain with both rounds
    assert blocked and not any(t.is_alive() for t in threads)
    entries = verify_file(tmp_path / "site-0" / "ledger.jsonl", site=0, trusted_pem=held.public_key()).entries
    assert sorted(e["round"] for e in entries if e["kind"] == "dp-sgd") == [1, 2]


def test_attack_and_fault_injection_are_simulation_only_and_do_what_they_say():
    from fedpeft.policy import PolicyError, check_noise_source
    from fedpeft.site import attackers

    # Prepare: 3 sites, sign-flip at 1/3 (one attacker)
    cfg = from_run_config({**TINY, "num-sites": 3, "attack": "sign-flip", "attack-fraction": 0.34,
                           "attack-scale": 4.0, "dp": False})
    bad = attackers(cfg)
    assert len(bad) == 1
    honest_cfg = from_run_config({**TINY, "num-sites": 3, "dp": False})
    glob = initial_adapter_state(cfg)
    s = next(iter(bad))
    # Execute
    honest, _, _ = site_train(honest_cfg, site=s, num_sites=3, server_round=1, global_state=glob, privacy_json=None)
    poisoned, _, _ = site_train(cfg, site=s, num_sites=3, server_round=1, global_state=glob, privacy_json=None)
    # Assert: exactly -4 x the honest delta (same seed, no DP); a deployed site refuses the config
    for k in honest:
        torch.testing.assert_close(poisoned[k], -4.0 * honest[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(PolicyError, match="refused on a deployed site"):
        check_noise_source(cfg, deployed=True)
    check_noise_source(cfg, deployed=False)


def test_a_secure_round_asked_again_is_trained_again_never_resent(tmp_path):
    from fedpeft.privacy.ledger import verify_file
    from fedpeft.privacy.vault import SiteVault
    from fedpeft.site import site_round

    # Prepare: the same round and global adapter asked twice (a resumed coordinator), once plaintext
    # and once with a seal (secure aggregation: its saved vector carries masks of keys since replaced)
    cfg = from_run_config({**TINY, "dp-noise": "seeded"})
    glob = initial_adapter_state(cfg)
    plain, secure = SiteVault(tmp_path / "plain", 0), SiteVault(tmp_path / "secure", 0)
    seal = lambda delta, w: {k: v * 1.0 for k, v in delta.items()}  # noqa: E731  # stands in for the masking
    # Execute
    p1 = site_round(cfg, site=0, num_sites=2, server_round=1, global_state=glob, vault=plain)
    p2 = site_round(cfg, site=0, num_sites=2, server_round=1, global_state=glob, vault=plain)
    site_round(cfg, site=0, num_sites=2, server_round=1, global_state=glob, vault=secure, seal=seal)
    site_round(cfg, site=0, num_sites=2, server_round=1, global_state=glob, vault=secure, seal=seal)
    # Assert: plaintext resends the same release (one ledger entry); secure trains again and signs it
    kinds = lambda v: [e["kind"] for e in verify_file(v.ledger.path, site=0, trusted_pem=v.public_key()).entries]  # noqa: E731
    assert kinds(plain) == ["open", "dp-sgd"] and all(torch.equal(p1.delta[k], p2.delta[k]) for k in p1.delta)
    assert kinds(secure) == ["open", "dp-sgd", "dp-sgd"]
