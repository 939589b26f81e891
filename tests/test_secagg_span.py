"""The 32-bit secure round (``fedpeft.secagg.span``): the range stage's sum, the step it gives, the
merged update against a float64 FedAvg oracle, a site dropping between the range and the vector
stage, the 64-bit fallback when a range vector is missing, and a site that sends its update once.
Each test plays the sites through their own folders (``fedpeft.secagg.site``) and the coordinator
through ``protocol``, in one process."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from fedpeft.aggregation.fedavg import fedavg
from fedpeft.privacy.ledger import delta_hash, verify_file
from fedpeft.privacy.vault import LEDGER_FILE, SiteVault
from fedpeft.secagg import protocol as sa
from fedpeft.secagg import ring, span
from fedpeft.secagg import site as secagg_site
from fedpeft.secagg.layout import Layout

ROUND = 4


def _deltas(n: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    g = torch.Generator().manual_seed(seed)
    deltas = [{"l.lora_A.weight": 1e-4 * torch.randn(4, 96, generator=g),
               "l.lora_B.weight": 3e-5 * torch.randn(96, 4, generator=g)} for _ in range(n)]
    return deltas, [120.0, 40.0, 300.0, 55.0, 90.0, 16.0][:n]


def _round(tmp_path, deltas, weights, *, no_range=frozenset(), no_vector=frozenset()):
    """Stages 1-4 with real site folders; returns (decoded sum, bits, raw vectors, range sum)."""
    n = len(deltas)
    vaults = {i: SiteVault(tmp_path / f"site-{i}", i) for i in range(n)}
    ads = [secagg_site.advertise_keys(v, ROUND) for v in vaults.values()]
    roster = {i: v.public_key() for i, v in vaults.items()}
    t = sa.threshold_for(n, 0.6, 2)
    shares = {i: secagg_site.share_keys(vaults[i], ROUND, ads, roster, t) for i in vaults}
    inbox = {j: {i: shares[i][j] for i in vaults} for j in vaults}
    participants = sorted(vaults)
    # stage 3: the train replies carry range vectors
    ranges = {}
    for i, v in vaults.items():
        seal = secagg_site.Sealer(v, ROUND, participants)
        sent = seal(deltas[i], weights[i])[secagg_site.MASKED]
        if i not in no_range:
            ranges[i] = sent.numpy().view(np.uint64)
    range_sum = span.range_total(ranges)
    bits = span.plan_bits(range_sum) if set(ranges) == set(participants) else span.FALLBACK
    # stage 3b: the sites that sent a range vector send their update at that step
    raw, masked = {}, {}
    for i in sorted(ranges):
        if i in no_vector:
            continue
        raw[i], line = secagg_site.send_vector(vaults[i], ROUND, bits)
        # the site's ledger now ends with the line it sent: signed, chained, binding this vector
        entry = verify_file(vaults[i].folder / LEDGER_FILE, site=i, trusted_pem=roster[i]).entries[-1]
        range_sha = delta_hash({secagg_site.MASKED: torch.from_numpy(ranges[i].view(np.int64).copy())})
        assert {k: v for k, v in json.loads(line).items() if k != "sig"} == entry and entry["kind"] == "secagg-vector"
        assert {k: entry[k] for k in ("round", "range_sha256", "vector_sha256", "ring_bits", "frac_bits")} == {
            "round": ROUND, "range_sha256": range_sha, "vector_sha256": hashlib.sha256(raw[i]).hexdigest(),
            "ring_bits": bits.ring_bits, "frac_bits": bits.frac_bits}
        masked[i] = span.widen(raw[i], Layout.of(deltas[0]).size, bits)
    survivors = sorted(masked)
    dropped = sorted(set(participants) - set(survivors))
    reveals = {i: secagg_site.reveal_shares(vaults[i], ROUND, inbox[i], survivors, dropped) for i in survivors}
    adverts = {a.site: a for a in (sa.KeyAdvert.from_json(x) for x in ads)}
    seeds, keys = sa.reconstruct(reveals, survivors=survivors, dropped=dropped, threshold=t, server_round=ROUND)
    total = sa.unmask_with(masked, adverts, seeds, keys, server_round=ROUND)
    return span.decode(total, bits), bits, raw, range_sum


def test_a_32_bit_round_gives_fedavg_within_the_stated_step(tmp_path):
    # Prepare: 6 sites, LoRA-sized deltas, weights = example counts; the float64 oracle
    deltas, weights = _deltas(6)
    layout = Layout.of(deltas[0])
    plain = fedavg([{k: v.double() for k, v in d.items()} for d in deltas], weights)
    bound = sum(math.ceil(max(w * float(t.double().abs().max()) for t in d.values()) * 2**32) / 2**32
                for d, w in zip(deltas, weights))  # by hand: sum of each site's max |w * delta|, rounded up
    # Execute
    total, bits, raw, range_sum = _round(tmp_path, deltas, weights)
    merged, weight = layout.unpack_mean(total)
    # Assert: the range sum is (sum M_i, sum w_i); the step is floor(30 - log2 B); 4 bytes a coordinate
    assert ring.decode(range_sum) == pytest.approx([bound, sum(weights)], rel=0, abs=1e-9)
    assert bits.as_dict() == {"ring_bits": 32, "frac_bits": math.floor(30 - math.log2(bound)),
                              "weight_frac_bits": math.floor(30 - math.log2(sum(weights)))}
    assert all(len(r) == 4 * layout.size for r in raw.values())
    assert weight == pytest.approx(sum(weights), rel=2**-28)
    tol = span.error_bound(bits, 6, sum(weights)) + 6 * 2.0**-29 * max(p.abs().max().item() for p in plain.values())
    for k in plain:
        err = (merged[k] - plain[k].double()).abs().max().item()
        assert err <= tol, (k, err, tol)
        assert ((merged[k] - plain[k].double()).norm() / plain[k].double().norm()).item() < 1e-6


def test_a_site_dropping_after_its_range_vector_leaves_the_survivors_sum(tmp_path):
    # Prepare: site 2 sends its range vector, then never its update
    deltas, weights = _deltas(6, seed=1)
    layout = Layout.of(deltas[0])
    # Execute
    total, bits, _, _ = _round(tmp_path, deltas, weights, no_vector={2})
    merged, weight = layout.unpack_mean(total)
    # Assert: still the narrow ring; the survivors' weighted mean, site 2 out of it
    keep = [i for i in range(6) if i != 2]
    plain = fedavg([{k: v.double() for k, v in deltas[i].items()} for i in keep], [weights[i] for i in keep])
    assert bits.ring_bits == 32 and weight == pytest.approx(sum(weights[i] for i in keep), rel=2**-28)
    for k in plain:
        assert ((merged[k] - plain[k].double()).norm() / plain[k].double().norm()).item() < 1e-6


def test_a_missing_range_vector_reveals_nothing_and_falls_back_to_the_64_bit_ring(tmp_path):
    # Prepare: site 5's range vector is lost (its update is never asked for)
    deltas, weights = _deltas(6, seed=2)
    layout = Layout.of(deltas[0])
    # Execute
    total, bits, raw, range_sum = _round(tmp_path, deltas, weights, no_range={5})
    merged, weight = layout.unpack_mean(total)
    # Assert: the five range vectors' sum is still masked (far from the true partial sums); 64-bit
    # ring at 32 fractional bits, 8 bytes a coordinate; the five sites' mean within its step
    partial = [sum(max(w * float(t.double().abs().max()) for t in d.values()) for d, w in
                   zip(deltas[:5], weights[:5])), sum(weights[:5])]
    assert abs(ring.decode(range_sum)[1] - partial[1]) > 1e3
    assert bits == span.FALLBACK and all(len(r) == 8 * layout.size for r in raw.values())
    plain = fedavg([{k: v.double() for k, v in d.items()} for d in deltas[:5]], weights[:5])
    assert weight == sum(weights[:5])
    for k in plain:
        assert (merged[k] - plain[k].double()).abs().max().item() <= 5 * 2.0**-33 / weight + 1e-18


def test_a_site_sends_its_update_once_and_refuses_a_ring_that_cannot_hold_it(tmp_path):
    # Prepare: two sites through stage 3
    vaults = {i: SiteVault(tmp_path / f"site-{i}", i) for i in range(2)}
    ads = [secagg_site.advertise_keys(v, ROUND) for v in vaults.values()]
    roster = {i: v.public_key() for i, v in vaults.items()}
    for v in vaults.values():
        secagg_site.share_keys(v, ROUND, ads, roster, 2)
    deltas, weights = _deltas(2)
    for i, v in vaults.items():
        secagg_site.Sealer(v, ROUND, [0, 1])(deltas[i], weights[i])
    # Execute / Assert: a step far too fine for site 0's update is refused, naming the range
    with pytest.raises(ring.RingError, match="beyond the round's range"):
        secagg_site.send_vector(vaults[0], ROUND, span.Bits(32, 50, 20))
    secagg_site.send_vector(vaults[1], ROUND, span.Bits(32, 30, 20))
    # a second request (two encodings under one mask would give away a multiple of the update)
    with pytest.raises(sa.SecAggError, match="already sent; it is never sent twice under one mask"):
        secagg_site.send_vector(vaults[1], ROUND, span.Bits(32, 28, 20))
    with pytest.raises(ring.RingError, match="ring-bits=48"):
        span.Bits(48, 20, 20)
