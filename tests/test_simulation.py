"""End to end on the `smoke` preset in Flower's Simulation Engine (Ray): slow, still in the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel

from fedpeft import models
from fedpeft.cli import simulate, simulation_config
from fedpeft.export import load_classifier
from fedpeft.runconfig import from_run_config
from tests.conftest import ONE_WORKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    # reruns compare bitwise; one Ray worker (each worker pays the ML stack's import; the sites' results
    # do not depend on how many run at once)
    flat = simulation_config("smoke", [f"dp-noise='seeded' {ONE_WORKER}"], str(out))
    return out, flat, simulate(flat)


def test_smoke_learns_and_writes_every_artifact(smoke_run):
    out, flat, metrics = smoke_run
    cfg = from_run_config(flat)
    rounds = metrics["rounds"]
    # metrics.json: round 0 (initial) + every round, every site with accuracy and epsilon
    assert [r["round"] for r in rounds] == list(range(cfg.federation.num_rounds + 1))
    assert json.loads((out / "metrics.json").read_text()) == metrics
    elapsed = [r["elapsed_s"] for r in rounds]  # seconds since the start, at each round's end
    assert elapsed == sorted(elapsed) and 0 < elapsed[0] and elapsed[-1] == metrics["wall_s"]
    assert metrics["precision"] in ("float32", "bfloat16")
    assert metrics["dp_noise"]["source"] == "seeded"
    assert "no protection against the coordinator" in metrics["dp_noise"]["statement"]
    for r in rounds[1:]:
        assert sorted(r["sites"], key=int) == [str(s) for s in range(cfg.federation.num_sites)]
        for m in r["sites"].values():
            assert 0 < m["epsilon"] <= cfg.privacy.target_epsilon and 0 <= m["accuracy"] <= 1
        assert r["bytes_up"] == cfg.federation.num_sites * metrics["adapter_bytes"] == r["bytes_down"]
    # epsilon grows round over round for every site
    for s in rounds[1]["sites"]:
        assert rounds[-1]["sites"][s]["epsilon"] > rounds[1]["sites"][s]["epsilon"]
    # learning: the last round beats round 0 on the global test set
    assert rounds[-1]["global"]["accuracy"] > rounds[0]["global"]["accuracy"] + 0.05
    for name in ("accuracy.png", "epsilon.png", "split.png"):
        assert (out / "plots" / name).stat().st_size > 5_000


def test_smoke_adapter_loads_with_peft(smoke_run):
    out, flat, metrics = smoke_run
    cfg = from_run_config(flat)
    base = models.load_base_model(cfg.model, num_labels=len(cfg.data.label_list), labels=cfg.data.label_list)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    tok = models.load_tokenizer(cfg.model.name)
    enc = tok(["45 year old man presenting with chest pain, palpitations."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, len(cfg.data.label_list)) and torch.isfinite(logits).all()
    with torch.no_grad():  # the one-line loader builds the same model from fedpeft.json
        torch.testing.assert_close(load_classifier(out / "adapter")(**enc).logits, logits, rtol=0, atol=0)
    ckpt = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpt] == [f"round-{r:03d}" for r in range(cfg.federation.num_rounds + 1)]
    # the final adapter is the last checkpoint
    a = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (ckpt[-1] / "adapter_model.safetensors").read_bytes()


def test_smoke_run_passes_fedpeft_audit_with_ledgers_for_every_site(smoke_run, capsys):
    from fedpeft.cli import main

    out, flat, metrics = smoke_run
    cfg = from_run_config(flat)
    # every site's ledger copy and key on the server side, one signed release per round
    for s in range(cfg.federation.num_sites):
        assert (out / "ledger" / f"site-{s}.pub").exists()
        assert len((out / "ledger" / f"site-{s}.jsonl").read_text().splitlines()) == 1 + cfg.federation.num_rounds
    for r in metrics["rounds"][1:]:
        assert sorted(r["merged"], key=int) == [str(s) for s in range(cfg.federation.num_sites)]
    assert main(["audit", str(out), "--empirical", "--canaries", "500"]) == 0
    report = json.loads((out / "audit" / "report.json").read_text())
    assert report["ok"] and report["checkpoints"] == list(range(cfg.federation.num_rounds + 1))
    for s, site in report["sites"].items():  # the claim equals what the sites reported per round
        assert site["claimed_epsilon"] == pytest.approx(metrics["rounds"][-1]["sites"][s]["epsilon"])
        assert report["empirical"]["sites"][s]["epsilon_lower_bound"] <= site["epsilon_rdp"]
    assert "seeded" in capsys.readouterr().out
    # the released adapter's model card: no placeholder, no build path, each site's epsilon, the audit
    card = (out / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card and "site-packages" not in card and "/root" not in card
    assert "## Audit\n\n**QUALIFIED PASS**" in card and "## Load" in card
    for s in range(cfg.federation.num_sites):
        assert f"site {s} {metrics['rounds'][-1]['sites'][str(s)]['epsilon']:.3f}" in card


def test_a_round_short_of_replies_then_a_sigkill_and_resume_give_the_uninterrupted_adapter_and_history(tmp_path):
    """Two faults in one run, each of which must leave no trace in the result. Round 1: sites 0 and
    1 crash after a DP step (fault-crash=0.5 picks them), so the round has 1 good reply < 2 and the
    server asks them again (round-retries=1); with seeded noise the retried steps are the same
    steps. Round 2: a real SIGKILL of the whole simulation (Ray included) while a site is in the
    middle of it (round 1 committed), then `fedpeft simulate --resume`. The final adapter equals the
    same federation run without faults (in this process, ``fedpeft.inprocess``: the same site code
    and merge without Flower or Ray) to float32 rounding, and no DP step is lost or doubled (the
    cut-short seeded steps are redone, not counted twice)."""
    from fedpeft.faults import crashes
    from fedpeft.inprocess import run_federation

    # Prepare: a light smoke (the faults, not the learning, are under test) and its reference
    light = f"dp-noise='seeded' local-epochs=1 notes-per-site=150 {ONE_WORKER}"
    out = tmp_path / "killed"
    ref_a, ref_rounds = run_federation(from_run_config(simulation_config("smoke", [light], str(tmp_path / "reference"))))
    faults = f"{light} fault-crash=0.5 round-retries=1"
    cfg = from_run_config(simulation_config("smoke", [faults], str(out)))
    assert [[s for s in range(3) if crashes(cfg, s, r)] for r in (1, 2)] == [[0, 1], []]
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "simulate", "--preset", "smoke", "--run-config",
                             faults, "--out", str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "server-state.json"
    deadline = time.monotonic() + 240
    def mid_round_2() -> bool:
        if not (state.exists() and json.loads(state.read_text())["round"] >= 1):
            return False
        return any(json.loads(p.read_text())["round"] == 2 for p in out.glob("sites/site-*/inflight.json"))

    while time.monotonic() < deadline and not mid_round_2():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "adapter").exists()  # it really was interrupted
    # Execute
    from fedpeft.cli import main
    assert main(["simulate", "--resume", str(out)]) == 0
    # Assert: the reference's DP steps and epsilon for every site (no step lost or doubled), and its adapter
    # to float32 rounding. It is bit for bit: the drift seen in CI (2026-12-02, 2026-12-07) was the
    # label-name head, computed in float32 by a pytest worker left at 1 thread by an earlier test
    # (now computed in float64: test_adapters::test_label_name_head_is_the_same_bits_at_any_thread_count)
    from safetensors.torch import load_file

    mine_a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(mine_a) == set(ref_a)
    for k in ref_a:
        torch.testing.assert_close(mine_a[k], ref_a[k], rtol=1e-6, atol=1e-6 * float(ref_a[k].abs().max()))
    metrics = json.loads((out / "metrics.json").read_text())
    r1 = metrics["rounds"][1]
    assert r1["retries"] == 1 and not r1["skipped"] and sorted(r1["merged"], key=int) == ["0", "1", "2"]
    assert sum("injected crash" in f["reason"] for f in r1["failures"]) == 2
    assert [r["global"]["accuracy"] for r in metrics["rounds"]] == pytest.approx([r.accuracy for r in ref_rounds],
                                                                                 rel=1e-4)
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2] and metrics["resumed_after"] >= 1
    from fedpeft.privacy.accountant import PrivacyState
    for s in range(3):
        mine = PrivacyState.from_json((out / "sites" / f"site-{s}" / f"privacy-site{s}.json").read_text())
        assert mine.steps_taken == sum(int(r.sites[s]["steps"]) for r in ref_rounds[1:]) > 0
        assert mine.epsilon() == pytest.approx(ref_rounds[-1].sites[s]["epsilon"], rel=1e-12)
    from fedpeft.privacy.audit.checks import audit_run
    assert audit_run(out).ok
