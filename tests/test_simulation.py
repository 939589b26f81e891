"""End to end on the `smoke` preset in Flower's Simulation Engine (Ray): slow, still in the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from peft import PeftModel

from fedpeft import models
from fedpeft.cli import simulate, simulation_config
from fedpeft.export import load_classifier
from fedpeft.runconfig import from_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    flat = simulation_config("smoke", ["dp-noise='seeded'"], str(out))  # reruns compare bitwise
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


def test_same_seed_gives_bitwise_the_same_global_adapter(tmp_path, smoke_run):
    out, flat, metrics = smoke_run
    again = simulate({**flat, "out-dir": str(tmp_path / "again")})
    assert again["rounds"][-1]["global"] == metrics["rounds"][-1]["global"]
    assert (tmp_path / "again" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter" / "adapter_model.safetensors").read_bytes()


def _default_sigint() -> None:
    """The child's own SIGINT handling: a background job (``nohup ... &``) inherits it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigterm_is_handled_as_ctrl_c():
    """SIGTERM raises the very KeyboardInterrupt that Ctrl-C raises, so it takes the path the test
    below runs end to end (Ray shut down, exit 130, completed rounds kept)."""
    from fedpeft.cli import _sigterm_as_interrupt

    old = signal.getsignal(signal.SIGTERM)
    try:
        _sigterm_as_interrupt()
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
    finally:
        signal.signal(signal.SIGTERM, old)


def test_ctrl_c_stops_the_simulation_within_seconds_and_keeps_completed_rounds(tmp_path):
    sig = signal.SIGINT
    # Prepare: a long smoke run in its own process (and process group, killed whatever happens)
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "simulate", "--preset", "smoke", "--out", str(out),
                             "--run-config", "num-server-rounds=50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, start_new_session=True)
    try:
        deadline = time.time() + 300
        rounds: list = []
        while time.time() < deadline and proc.poll() is None:
            try:
                rounds = json.loads((out / "metrics.json").read_text())["rounds"]
            except (OSError, ValueError):
                rounds = []
            if len(rounds) >= 2:  # round 0 and round 1 are on disk
                break
            time.sleep(0.5)
        assert len(rounds) >= 2, "the run never completed a round"
        children = psutil.Process(proc.pid).children(recursive=True)
        # Execute: Ctrl-C (or a service manager's SIGTERM)
        t0 = time.time()
        proc.send_signal(sig)
        proc.wait(timeout=60)
        took = time.time() - t0
        # Assert: stopped within seconds, said so, Ray's processes gone, completed rounds intact
        assert proc.returncode == 130 and took < 15, (proc.returncode, took)
        assert "interrupted" in proc.stderr.read()
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, [p.cmdline()[:2] for p in alive]
        done = json.loads((out / "metrics.json").read_text())["rounds"]
        assert len(done) >= 2 and all("global" in r for r in done)
        last = done[-1]["round"]
        assert (out / "checkpoints" / f"round-{last:03d}" / "adapter_model.safetensors").exists()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)


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


def test_sigkill_then_resume_gives_bitwise_the_uninterrupted_adapter(tmp_path, smoke_run):
    """A real SIGKILL of the whole simulation (Ray included) while a site is in the middle of round 2
    (round 1 committed), then `fedpeft simulate --resume`: same final adapter, bit for bit, and no
    DP step lost or doubled (the cut-short seeded steps are redone, not counted twice)."""
    out_ref, flat, _ = smoke_run
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "simulate", "--preset", "smoke", "--run-config",
                             "dp-noise='seeded'", "--out", str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "server-state.json"
    deadline = time.monotonic() + 240
    def mid_round_2() -> bool:
        if not (state.exists() and json.loads(state.read_text())["round"] >= 1):
            return False
        return any(json.loads(p.read_text())["round"] == 2 for p in out.glob("sites/site-*/inflight.json"))

    while time.monotonic() < deadline and not mid_round_2():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "adapter").exists()  # it really was interrupted
    # Execute
    from fedpeft.cli import main
    assert main(["simulate", "--resume", str(out)]) == 0
    # Assert: a second process and a fresh Ray give bitwise the reference run's adapter and metrics
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out_ref / "adapter" / "adapter_model.safetensors").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][-1]["global"] == json.loads((out_ref / "metrics.json").read_text())["rounds"][-1]["global"]
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2] and metrics["resumed_after"] >= 1
    for s in range(3):
        mine = json.loads((out / "sites" / f"site-{s}" / f"privacy-site{s}.json").read_text())["history"]
        ref = json.loads((out_ref / "sites" / f"site-{s}" / f"privacy-site{s}.json").read_text())["history"]
        assert mine == ref
    from fedpeft.privacy.audit.checks import audit_run
    assert audit_run(out).ok


def test_a_late_site_is_left_out_by_the_round_timeout_and_recorded(tmp_path):
    # Prepare: one round; site 0 answers 55 s late (seed 2 picks it); the server waits 40 s (a
    # punctual round of 1 local epoch, cold start included, takes ~6 s alone on 2 cores and more
    # beside the suite's other worker; 18 s and, on 2026-12-02, 30 s were seen to be too short). One round only: a sleeping
    # virtual site keeps its Ray worker busy, which would delay the next round's punctual sites.
    flat = simulation_config("smoke", ["dp-noise='seeded' seed=2 fault-late=0.2 fault-late-seconds=55 "
                                       "round-timeout=40 num-server-rounds=1 local-epochs=1"], str(tmp_path))
    cfg = from_run_config(flat)
    from fedpeft.faults import is_late
    assert [s for s in range(3) if is_late(cfg, s, 1)] == [0]
    # Execute
    metrics = simulate(flat)
    # Assert: the round merged the two punctual sites and named the missing reply
    r = metrics["rounds"][1]
    assert [f["reason"] for f in r["failures"]] == ["no reply within the round's timeout (round-timeout)"]
    assert sorted(r["merged"], key=int) == ["1", "2"] and not r["skipped"]


def test_a_hung_site_is_timed_out_and_its_drawn_noise_is_accounted(tmp_path):
    """Site 1 hangs in round 1 after its first DP step (seed 8 picks it, and nobody in round 2): the
    server stops waiting at round-timeout, merges the other two and records the missing reply; in
    round 2 site 1 trains again, and its signed ledger counts the hung round's step."""
    from fedpeft.faults import hangs
    from fedpeft.privacy.accountant import PrivacyState
    from fedpeft.privacy.audit.checks import audit_run

    # Prepare: 1 local epoch, so the two punctual sites (which share the one Ray worker the hung
    # site leaves) answer well inside the timeout even on a loaded 2-core machine
    flat = simulation_config("smoke", ["dp-noise='seeded' seed=8 fault-hang=0.3 fault-hang-seconds=55 "
                                       "round-timeout=40 local-epochs=1"], str(tmp_path))
    cfg = from_run_config(flat)
    assert [[s for s in range(3) if hangs(cfg, s, r)] for r in (1, 2)] == [[1], []]
    # Execute
    metrics = simulate(flat)
    # Assert: round 1 merged sites 0 and 2 and named the silent one; round 2 merged all three
    r1, r2 = metrics["rounds"][1], metrics["rounds"][2]
    assert [f["reason"] for f in r1["failures"]] == ["no reply within the round's timeout (round-timeout)"]
    assert sorted(r1["merged"], key=int) == ["0", "2"] and not r1["skipped"]
    assert sorted(r2["merged"], key=int) == ["0", "1", "2"]
    # site 1 took 1 step in round 1 (its noise was drawn before it hung) and a full round 2
    state = PrivacyState.from_json((tmp_path / "sites" / "site-1" / "privacy-site1.json").read_text())
    assert state.steps_taken == 1 + state.planned_steps // 2  # planned: 2 rounds of equal steps
    res = audit_run(tmp_path)
    assert res.ok, res.failures
    assert res.sites[1].steps == state.steps_taken


def test_a_round_short_of_replies_asks_again_and_ends_as_if_nothing_failed(tmp_path, smoke_run):
    """Sites 0 and 1 crash mid-round 1 (after a DP step); round 1 then has 1 good reply < 2, so the
    server asks them again (round-retries=1). With seeded noise the retried steps are the same steps:
    the final adapter and every site's privacy history equal the run that never failed."""
    out_ref, _, _ = smoke_run
    flat = simulation_config("smoke", ["dp-noise='seeded' fault-crash=0.5 round-retries=1"], str(tmp_path))
    metrics = simulate(flat)
    r1 = metrics["rounds"][1]
    assert r1["retries"] == 1 and not r1["skipped"] and sorted(r1["merged"], key=int) == ["0", "1", "2"]
    assert sum("injected crash" in f["reason"] for f in r1["failures"]) == 2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out_ref / "adapter" / "adapter_model.safetensors").read_bytes()
    for s in range(3):
        mine = json.loads((tmp_path / "sites" / f"site-{s}" / f"privacy-site{s}.json").read_text())["history"]
        ref = json.loads((out_ref / "sites" / f"site-{s}" / f"privacy-site{s}.json").read_text())["history"]
        assert mine == ref


def test_server_waits_for_virtual_nodes_still_registering_before_judging_the_federation_size():
    from fedpeft.server import _connected_nodes

    # Prepare: a grid whose nodes register one by one, as the simulation engine's do
    class Grid:
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return list(range(min(self.calls, 4)))

    # Execute
    nodes = _connected_nodes(Grid(), 4, wait_s=5.0)
    short = _connected_nodes(type("G", (), {"get_node_ids": lambda self: [1, 2]})(), 4, wait_s=0.3)
    # Assert: the count waits for the fourth node; a federation that stays short is reported as it is
    assert nodes == 4
    assert short == 2
