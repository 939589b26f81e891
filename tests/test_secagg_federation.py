"""Secure aggregation end to end in Flower's Simulation Engine (`smoke`, seeded): the same adapter
as the plaintext run within the ring's step, no per-site update or count in what the coordinator
kept, a site dropping after sharing its keys, and an audit that fails on an altered or missing
masked vector.

The plaintext references run in this process (``fedpeft.inprocess``: the same site code and merge
without Flower or Ray), which gives the Flower plaintext run's adapter bit for bit
(``tests/test_ray_cluster.py`` checks that), without a second Ray start per comparison."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from fedpeft.cli import simulate, simulation_config
from fedpeft.inprocess import run_federation
from fedpeft.privacy.audit.checks import audit_run
from fedpeft.runconfig import from_run_config
from fedpeft.secagg import ring, span
from fedpeft.secagg.site import MASKED
from tests.conftest import ONE_WORKER

pytestmark = pytest.mark.slow


ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    secure = tmp_path_factory.mktemp("secure")
    plain = tmp_path_factory.mktemp("plain")
    seeded = "dp-noise='seeded' local-epochs=1 notes-per-site=100"  # equality of adapters, not learning: small
    m_secure = simulate(simulation_config("smoke", [f"{seeded} secure-aggregation=true {ONE_WORKER}"], str(secure)))
    # one round, planned as two: the same sigma as the secure run (DP calibrates for the planned rounds)
    plain_cfg = from_run_config(simulation_config("smoke", [f"{seeded} num-server-rounds=1 dp-planned-rounds=2"],
                                                  str(plain)))
    plain_adapter, plain_rounds = run_federation(plain_cfg)
    return secure, m_secure, plain_adapter, [r.accuracy for r in plain_rounds]


def test_secure_run_gives_the_plaintext_adapter(runs):
    # Prepare
    secure, m_secure, b, plain_accuracy = runs
    # Execute: round 1's adapters (the plaintext reference runs one round)
    a = load_file(str(secure / "checkpoints" / "round-001" / ADAPTER))
    # Assert: every tensor within float32 rounding plus the ring's step (relative 1e-6 at most)
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).norm().item()
        assert diff <= 1e-6 * max(b[k].double().norm().item(), 1e-12), k
    assert [r["global"]["accuracy"] for r in m_secure["rounds"][:2]] == pytest.approx(plain_accuracy, abs=0.011)


def test_coordinator_keeps_only_masked_vectors_and_no_per_site_counts(runs):
    # Prepare
    secure, metrics, _, _ = runs
    # Execute
    info = json.loads((secure / "secagg" / "round-000001" / "round.json").read_text())
    sites = metrics["rounds"][1]["sites"]
    ranges = {s: load_file(str(secure / "secagg" / "round-000001" / f"range-{s}.safetensors"))[MASKED]
              for s in (0, 1, 2)}
    bound, weight = ring.decode(span.range_total({s: t.numpy().view(np.uint64) for s, t in ranges.items()}))
    # Assert: the round's record names every site; the range vectors sum to one bound and the total
    # weight (each alone is masked: not a weight); the ring is the 32-bit one that bound gives; the
    # sites reported no example count, loss or local accuracy of their own
    assert info["survivors"] == info["participants"] == info["range_senders"] == [0, 1, 2]
    assert info["threshold"] == 2 and weight == round(weight) > 0 < bound  # a sum of example counts
    assert all(not 0 < ring.decode(t.numpy().view(np.uint64))[1] <= weight for t in ranges.values())
    assert info["ring"] == {"ring_bits": 32, "frac_bits": math.floor(30 - math.log2(bound)),
                            "weight_frac_bits": math.floor(30 - math.log2(weight))}
    for s in ("0", "1", "2"):
        assert "epsilon" in sites[s] and not {"num-examples", "train-loss", "local-accuracy"} & set(sites[s])
    masked = load_file(str(secure / "secagg" / "round-000001" / "site-0.safetensors"))["masked"]
    assert str(masked.dtype) == "torch.int32" and masked.unique().numel() > 0.99 * masked.numel()
    assert sorted(info["not_checked"]) == ["norm of each update", "per-coordinate update bound", "robust merges"]


def test_audit_verifies_every_secure_round_and_fails_on_tampering(runs, tmp_path):
    # Prepare: two copies of the honest run, one with a masked vector altered, one with one removed
    secure, _, _, _ = runs
    honest = audit_run(secure)
    altered, missing = tmp_path / "altered", tmp_path / "missing"
    shutil.copytree(secure, altered)
    shutil.copytree(secure, missing)
    path = altered / "secagg" / "round-000002" / "site-1.safetensors"
    t = load_file(str(path))["masked"]
    t[5] += 1
    save_file({"masked": t}, str(path))
    (missing / "secagg" / "round-000001" / "site-2.safetensors").unlink()
    # Execute
    bad, gone = audit_run(altered), audit_run(missing)
    # Assert
    assert honest.ok and len(honest.secure_rounds) == 2
    assert any("secure round 2: site 1's masked vector" in f and "no signed ledger entry" in f for f in bad.failures)
    assert any("secure round 1: site 2's masked vector is missing" in f for f in gone.failures)


def test_mixed_ranks_under_frozen_a_give_the_plaintext_adapter(tmp_path):
    # Prepare: ranks 2, 4, 8 merged by frozen_a (an exact weighted sum), one short round, both ways
    base = "dp-noise='seeded' lora-ranks='2,4,8' merge='frozen_a' num-server-rounds=1 local-epochs=1 notes-per-site=100"
    # Execute
    secure = simulate(simulation_config("smoke", [f"{base} secure-aggregation=true {ONE_WORKER}"], str(tmp_path / "secure")))
    b, _ = run_federation(from_run_config(simulation_config("smoke", [base], str(tmp_path / "plain"))))
    a = load_file(str(tmp_path / "secure" / "checkpoints" / "round-001" / ADAPTER))
    # Assert: the same adapter within float32 rounding; the ranks recorded; the audit replays the round
    for k in a:
        assert (a[k].double() - b[k].double()).norm().item() <= 1e-6 * max(b[k].double().norm().item(), 1e-12), k
    assert secure["rounds"][1]["ranks"] == {"0": 2, "1": 4, "2": 8}
    assert audit_run(tmp_path / "secure").ok


def test_the_answer_head_under_secure_aggregation_gives_the_plaintext_adapter_and_the_audit_checks_it(tmp_path):
    from fedpeft.methods import answer_head

    # Prepare: tiny-gen with the head (sites train and mask V; checkpoints hold plain peft's A = V M),
    # one round both ways; recentring, post-processing after the last round, off to compare the merge
    base = "dp-noise='seeded' answer-head=true num-server-rounds=1 answer-head-recentre=0"
    head = "base_model.model.lm_head.lora_A.weight"
    # Execute
    simulate(simulation_config("tiny-gen", [f"{base} secure-aggregation=true {ONE_WORKER}"], str(tmp_path / "secure")))
    b, _ = run_federation(from_run_config(simulation_config("tiny-gen", [base], str(tmp_path / "plain"))))
    folder = tmp_path / "secure" / "checkpoints" / "round-001"
    a = load_file(str(folder / ADAPTER))
    whiten = answer_head.read_statistics(folder)
    honest = audit_run(tmp_path / "secure")
    tampered = tmp_path / "tampered"
    shutil.copytree(tmp_path / "secure", tampered)
    t = load_file(str(tampered / "checkpoints" / "round-001" / ADAPTER))
    t[head][0, 0] += 1e-3  # a coordinator's small push on one choice
    save_file(t, str(tampered / "checkpoints" / "round-001" / ADAPTER))
    swapped = tmp_path / "swapped"  # ... or another M for one round
    shutil.copytree(tmp_path / "secure", swapped)
    stats = load_file(str(swapped / "checkpoints" / "round-001" / answer_head.STATISTICS_FILE))
    save_file({**stats, "std": stats["std"] * 1.01}, str(swapped / "checkpoints" / "round-001" / answer_head.STATISTICS_FILE))
    garbled = tmp_path / "garbled"  # ... or a file that is no safetensors, the same in both rounds
    shutil.copytree(tmp_path / "secure", garbled)
    for r in ("round-000", "round-001"):
        (garbled / "checkpoints" / r / answer_head.STATISTICS_FILE).write_bytes(b"not safetensors")
    # Assert: the plaintext merge, in the saved coordinates, within float32 rounding plus the ring's step;
    # the audit passes the honest run and names the head in the tampered one
    assert whiten is not None and set(a) - set(b) == {"base_model.model.lm_head.lora_B.weight"}
    want = {**b, head: b[head].double() @ whiten.matrix.double()}
    for k in b:
        assert (a[k].double() - want[k].double()).norm().item() <= 1e-6 * max(want[k].double().norm().item(), 1e-12), k
    assert honest.ok and [n.split(":")[0] for n in honest.secure_rounds] == ["secure round 1", "answer head"]
    assert any(f"{head}: the unmasked mean differs" in f for f in audit_run(tampered).failures)
    assert any("statistics (answer_head_statistics.safetensors) differ between the checkpoints of rounds 0 and 1" in f
               for f in audit_run(swapped).failures)
    assert any("secure round 1: the answer head's statistics are unreadable" in f for f in audit_run(garbled).failures)
