"""Secure aggregation's core: the ring against hand-computed values, the secure sum against the
plaintext merges (fedavg, and frozen_a with mixed ranks), sites dropping at every stage, a swapped
key caught by the peers, and no unmasking below the threshold."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fedpeft.aggregation.fedavg import fedavg
from fedpeft.aggregation.hetero import frozen_a
from fedpeft.privacy.ledger import new_key, public_pem
from fedpeft.secagg import protocol as sa
from fedpeft.secagg import ring, shamir
from fedpeft.secagg.layout import Layout, LayoutError
from fedpeft.secagg.protocol import SecAggError

ROUND = 3


def _federation(n: int) -> tuple[dict[int, object], dict[int, str]]:
    keys = {i: new_key() for i in range(n)}
    return keys, {i: public_pem(k) for i, k in keys.items()}


def _secure_round(vectors: dict[int, np.ndarray], *, fraction: float = 0.67, no_advert: set[int] = frozenset(),
                  no_masked: set[int] = frozenset(), no_reveal: set[int] = frozenset(), tamper=None
                  ) -> tuple[np.ndarray, int]:
    """The four stages as a coordinator and its sites run them, in one process; returns (decoded sum, t)."""
    keys, roster = _federation(max(vectors) + 1)
    secrets = {i: sa.SiteSecrets.generate(i, ROUND) for i in vectors}
    # stage 1: adverts (sites in no_advert drop before sending theirs)
    adverts = [sa.advertise(secrets[i], keys[i]) for i in vectors if i not in no_advert]
    if tamper is not None:
        adverts = tamper(adverts)
    # stage 2: every site checks the relayed adverts against its roster, then shares
    verified = {i: sa.verify_adverts(adverts, roster=roster, server_round=ROUND) for i in vectors if i not in no_advert}
    participants = sorted(next(iter(verified.values())))
    t = sa.threshold_for(len(participants), fraction, 2)
    shares = {i: sa.make_shares(secrets[i], verified[i], threshold=t) for i in participants}
    inbox = {j: {i: shares[i][j] for i in participants} for j in participants}  # the coordinator routes
    # stage 3: masked vectors (sites in no_masked drop after sharing)
    masked = {i: sa.mask(secrets[i], ring.encode(vectors[i]), verified[i], participants)
              for i in participants if i not in no_masked}
    survivors = sorted(masked)
    dropped = sorted(set(participants) - set(survivors))
    # stage 4: reveals (sites in no_reveal drop after sending their vector)
    reveals = {i: sa.reveal(secrets[i], verified[i], inbox[i], survivors=survivors, dropped=dropped, threshold=t)
               for i in survivors if i not in no_reveal}
    total = sa.unmask(masked, verified[participants[0]], reveals, participants=participants, threshold=t,
                      server_round=ROUND)
    return ring.decode(total), t


def test_ring_encodes_hand_computed_fixed_point_and_refuses_overflow():
    # Prepare: 1.5 * 2^32 = 6442450944; -2^-32 is the ring's -1, i.e. 2^64 - 1
    x = np.array([1.5, -(2.0**-32), 0.0])
    # Execute
    y = ring.encode(x)
    # Assert
    assert y.tolist() == [6442450944, 2**64 - 1, 0]
    np.testing.assert_array_equal(ring.decode(ring.add(y, y)), 2 * x)
    with pytest.raises(ring.RingError, match="2.147e"):
        ring.encode(np.array([2.0**31]))
    with pytest.raises(ring.RingError, match="NaN"):
        ring.encode(np.array([np.nan]))
    with pytest.raises(ring.RingError, match="1000 sites"):
        ring.check_headroom(max_abs=3e6, sites=1000)


def test_prg_is_chacha20_of_the_full_seed():
    # Prepare: two seeds that differ in their last byte only (Flower's 32-bit fold would often collide)
    a, b = bytes(32), bytes(31) + b"\x01"
    # Execute
    ma, mb = ring.prg(a, 1000), ring.prg(b, 1000)
    # Assert: RFC 7539's ChaCha20 block for the zero key and nonce starts 76 b8 e0 ad a0 f1 3d 90
    assert ma[0] == int.from_bytes(bytes.fromhex("76b8e0ada0f13d90"), "little")
    assert (ma != mb).mean() > 0.99 and np.array_equal(ma, ring.prg(a, 1000))


def test_secure_sum_equals_plaintext_fedavg_within_the_ring_step():
    # Prepare: 6 sites, LoRA-sized deltas (~1e-4), weights = example counts
    g = torch.Generator().manual_seed(0)
    deltas = [{"l.lora_A.weight": 1e-4 * torch.randn(8, 64, generator=g),
               "l.lora_B.weight": 1e-4 * torch.randn(64, 8, generator=g)} for _ in range(6)]
    weights = [120.0, 40.0, 300.0, 55.0, 90.0, 16.0]
    layout = Layout.of(deltas[0])
    vectors = {i: layout.pack(d, w) for i, (d, w) in enumerate(zip(deltas, weights))}
    # Execute
    total, _ = _secure_round(vectors)
    merged, weight = layout.unpack_mean(total)
    # Assert: the same merge as plaintext fedavg; error below 6 sites x half a ring step / total weight
    plain = fedavg([{k: v.double() for k, v in d.items()} for d in deltas], weights)  # float64 oracle
    assert weight == sum(weights)
    bound = 6 * 0.5 * 2.0**-32 / sum(weights)
    for k in plain:
        err = (merged[k] - plain[k].double()).abs().max().item()
        assert err <= bound + 1e-18, (k, err, bound)
        rel = ((merged[k] - plain[k].double()).norm() / plain[k].double().norm()).item()
        assert rel < 1e-6


def test_secure_sum_equals_frozen_a_with_mixed_ranks():
    # Prepare: ranks 2, 4, 8 nested in a shared A of rank 8; s_k = alpha / r_k
    g = torch.Generator().manual_seed(1)
    shared_a = torch.randn(8, 32, generator=g)
    ranks, weights, alpha = [2, 4, 8], [50.0, 70.0, 20.0], 16.0
    Bs = [1e-3 * torch.randn(32, r, generator=g) for r in ranks]
    scalings = [alpha / r for r in ranks]
    layout = Layout((("m.lora_B.weight", (32, 8)),))
    vectors = {i: layout.pack({"m.lora_B.weight": s * b}, w, pad_dim={"m.lora_B.weight": 1})
               for i, (b, s, w) in enumerate(zip(Bs, scalings, weights))}
    # Execute
    total, _ = _secure_round(vectors)
    merged, _ = layout.unpack_mean(total)
    # Assert: hetero.frozen_a's B (an exact weighted sum of the padded, scaled B_k)
    plain = frozen_a([shared_a[:r] for r in ranks], Bs, scalings, weights, max_rank=8, shared_A=shared_a)
    torch.testing.assert_close(merged["m.lora_B.weight"], plain.B, rtol=0, atol=3 * 2.0**-32)
    with pytest.raises(LayoutError, match="does not fit"):
        layout.pack({"m.lora_B.weight": torch.zeros(32, 9)}, 1.0, pad_dim={"m.lora_B.weight": 1})


@pytest.mark.parametrize("stage", ["advert", "masked", "reveal"])
def test_dropouts_above_the_threshold_still_give_the_survivors_sum(stage):
    # Prepare: 6 sites, threshold ceil(0.6 * n) (4 of 6); sites 1 and 4 drop at the given stage
    rng = np.random.default_rng(2)
    vectors = {i: rng.normal(size=50) * 1e-2 for i in range(6)}
    drop = {1, 4}
    kw = {"advert": {"no_advert": drop}, "masked": {"no_masked": drop}, "reveal": {"no_reveal": drop}}[stage]
    # Execute
    total, t = _secure_round(vectors, fraction=0.6, **kw)
    # Assert: a site that drops before its vector is out of the sum; one that drops after is in it
    counted = [i for i in vectors if stage == "reveal" or i not in drop]
    np.testing.assert_allclose(total, sum(vectors[i] for i in counted), rtol=0, atol=6 * 2.0**-32)


@pytest.mark.parametrize("stage", ["masked", "reveal"])
def test_below_the_threshold_the_round_is_refused_not_merged(stage):
    # Prepare: 5 sites, threshold 4 (fraction 0.8); two drop
    vectors = {i: np.full(10, float(i)) for i in range(5)}
    kw = {"no_masked": {0, 3}} if stage == "masked" else {"no_reveal": {0, 3}}
    # Execute / Assert: survivors refuse to reveal below the threshold, or too few reveals arrive
    with pytest.raises(sa.SecAggError, match="threshold"):
        _secure_round(vectors, fraction=0.8, **kw)


def test_a_coordinator_that_swaps_a_key_is_caught_by_the_peers():
    # Prepare: the coordinator replaces site 2's mask key with one of its own
    mine = sa.SiteSecrets.generate(2, ROUND)

    def swap(adverts):
        return [sa.KeyAdvert(a.site, a.server_round, sa._raw_pub(mine.mask_key), a.share_pub, a.signature)
                if a.site == 2 else a for a in adverts]

    # Execute / Assert: every peer's check names site 2
    with pytest.raises(sa.SecAggError, match="site 2: key advert signature does not verify"):
        _secure_round({i: np.zeros(4) for i in range(4)}, tamper=swap)
    # a site off the roster, and a replayed advert of another round, are refused too
    keys, roster = _federation(3)
    s = sa.SiteSecrets.generate(7, ROUND)
    with pytest.raises(sa.SecAggError, match="site 7: not on the roster"):
        sa.verify_adverts([sa.advertise(s, new_key())], roster=roster, server_round=ROUND)
    old = sa.advertise(sa.SiteSecrets.generate(0, ROUND - 1), keys[0])
    with pytest.raises(sa.SecAggError, match="round 2, this is round 3"):
        sa.verify_adverts([old], roster=roster, server_round=ROUND)


def test_fewer_shares_than_the_threshold_do_not_unmask_a_site():
    # Prepare: 5 sites, threshold 4; the coordinator collects site 0's self-seed shares from 3 peers
    keys, roster = _federation(5)
    secrets = {i: sa.SiteSecrets.generate(i, ROUND) for i in range(5)}
    adverts = sa.verify_adverts([sa.advertise(secrets[i], keys[i]) for i in range(5)], roster=roster,
                                server_round=ROUND)
    shares = {i: sa.make_shares(secrets[i], adverts, threshold=4) for i in range(5)}
    got = [sa.reveal(secrets[j], adverts, {0: shares[0][j]}, survivors=range(5), dropped=[], threshold=4)[0][1]
           for j in (1, 2, 3)]
    # Execute: three shares combined, and four
    try:
        three = shamir.combine(got)
    except ValueError:
        three = None
    four = sa.reveal(secrets[4], adverts, {0: shares[0][4]}, survivors=range(5), dropped=[], threshold=4)[0][1]
    # Assert: three shares give nothing (wrong or invalid); four give the seed
    assert three != secrets[0].self_seed
    assert shamir.combine([*got, four]) == secrets[0].self_seed
    # and a site asked to reveal both shares of one peer refuses
    with pytest.raises(sa.SecAggError, match=r"both survived and dropped"):
        sa.reveal(secrets[1], adverts, {}, survivors=[0, 1, 2, 3], dropped=[0], threshold=4)


def test_a_wrong_revealed_seed_share_fails_the_signed_commitment_naming_the_site():
    """A revealed share the coordinator (or a revealer) altered rebuilds a wrong self-mask seed: the
    unmasking refuses it against the seed's commitment in the site's signed advert, instead of
    returning noise as the sum."""
    # Prepare: 3 sites, threshold 2; the survivors' shares of site 1's seed, one of them altered
    keys, roster = _federation(3)
    secrets = {i: sa.SiteSecrets.generate(i, ROUND) for i in range(3)}
    adverts = sa.verify_adverts([sa.advertise(secrets[i], keys[i]) for i in range(3)], roster=roster,
                                server_round=ROUND)
    shares = {i: sa.make_shares(secrets[i], adverts, threshold=2) for i in range(3)}
    x = {i: ring.encode(np.full(3, float(i))) for i in range(3)}
    masked = {i: sa.mask(secrets[i], x[i], adverts, [0, 1, 2]) for i in range(3)}
    reveals = {j: sa.reveal(secrets[j], adverts, {i: shares[i][j] for i in range(3)}, survivors=[0, 1, 2],
                            dropped=[], threshold=2) for j in range(3)}
    kind, share = reveals[0][1]
    reveals[0][1] = (kind, share[:-1] + bytes([share[-1] ^ 1]))
    # Execute / Assert: the honest reveals unmask to 0 + 1 + 2; the altered one is named
    honest = sa.unmask(masked, adverts, {j: r for j, r in reveals.items() if j != 0}, participants=[0, 1, 2],
                       threshold=2, server_round=ROUND)
    np.testing.assert_allclose(ring.decode(honest), np.full(3, 3.0), atol=1e-9)
    with pytest.raises(sa.SecAggError, match="self-mask seed of site 1 does not match its signed advert"):
        sa.unmask(masked, adverts, {j: reveals[j] for j in (0, 2)}, participants=[0, 1, 2], threshold=2,
                  server_round=ROUND)
    # and the commitment is what the site signed: a coordinator cannot replace it
    forged = [sa.KeyAdvert(a.site, a.server_round, a.mask_pub, a.share_pub, a.signature, b"\0" * 32)
              for a in adverts.values()]
    with pytest.raises(sa.SecAggError, match="signature does not verify"):
        sa.verify_adverts(forged, roster=roster, server_round=ROUND)


def test_an_altered_share_is_refused_naming_its_sender():
    # Prepare
    keys, roster = _federation(3)
    secrets = {i: sa.SiteSecrets.generate(i, ROUND) for i in range(3)}
    adverts = sa.verify_adverts([sa.advertise(secrets[i], keys[i]) for i in range(3)], roster=roster,
                                server_round=ROUND)
    ct = sa.make_shares(secrets[2], adverts, threshold=2)[0]
    bad = ct[:-1] + bytes([ct[-1] ^ 1])
    # Execute / Assert
    with pytest.raises(sa.SecAggError, match="share from site 2 does not decrypt"):
        sa.reveal(secrets[0], adverts, {2: bad}, survivors=[0, 1, 2], dropped=[], threshold=2)


def test_shares_travel_as_raw_bytes_in_a_config_record_and_malformed_ones_are_named():
    # Prepare
    from flwr.app import ConfigRecord

    from fedpeft.secagg import wire
    keys, roster = _federation(3)
    secrets = {i: sa.SiteSecrets.generate(i, ROUND) for i in range(3)}
    adverts = sa.verify_adverts([sa.advertise(secrets[i], keys[i]) for i in range(3)], roster=roster,
                                server_round=ROUND)
    shares = sa.make_shares(secrets[1], adverts, threshold=2)
    # Execute: through Flower's record, as the coordinator routes it; then site 0 reveals
    got = wire.read_shares(dict(ConfigRecord(wire.shares_record(shares))))
    rev = sa.reveal(secrets[0], adverts, {1: got[0]}, survivors=[0, 2], dropped=[1], threshold=2)
    back = wire.read_reveal(dict(ConfigRecord(wire.reveal_record(rev))))
    # Assert: two 35-byte shares (x 2 + y 33) + GCM tag 16 bytes, no nonce (hand-computed), and the
    # round trips hold
    assert shamir.SHARE_BYTES == 35
    assert got == shares and all(len(c) == 2 * 35 + 16 for c in got.values())
    assert back == rev and back[1][0] == "s" and len(back[1][1]) == shamir.SHARE_BYTES
    assert wire.record_bytes(wire.shares_record(shares)) == 3 * 8 + 3 * 86
    with pytest.raises(ValueError, match="share-site/share-ct"):
        wire.read_shares({"share-site": [0, 1], "share-ct": [b"x"]})
    with pytest.raises(ValueError, match="reveal-kind"):
        wire.read_reveal({**wire.reveal_record(rev), "reveal-kind": ["x"]})


# ---- distributed DP: the Skellam mechanism ----

def test_skellam_rdp_hand_computed():
    from fedpeft.secagg import ddp

    # Prepare / Execute: order 2, L1 = 10, L2 = 3, variance 100 (Agarwal et al. 2021, Corollary 3.6)
    got = ddp.skellam_rdp(2, l1=10.0, l2=3.0, variance=100.0)
    # Assert: 2*9/200 + min((3*9 + 60) / (4 * 100^2), 3*10/200) = 0.09 + 0.002175
    assert got == pytest.approx(0.092175, rel=1e-12)


def test_skellam_epsilon_tends_to_opacus_gaussian_at_fine_scales():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedpeft.secagg import ddp

    # Prepare: noise multiplier z = 1.2 on clip C = 1, 5 releases, d = 1000, scale 1000 (integers ~ 1e3)
    z, rounds, d, s, delta = 1.2, 5, 1000, 1000.0, 1e-5
    # Execute
    eps = ddp.epsilon(releases=[(z * s) ** 2] * rounds, clip=1.0, scale=s, dim=d, delta=delta)
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=rounds, orders=list(ddp.ORDERS))
    gauss, _ = get_privacy_spent(orders=list(ddp.ORDERS), rdp=rdp, delta=delta)
    # Assert: Skellam pays for rounding (L2 bound ~0.1 % above sC) and its discreteness, so slightly more
    # than the Gaussian mechanism (Mironov 2017, as Opacus computes it), within 1 %
    assert gauss <= eps <= 1.01 * gauss


def test_calibrated_variance_is_the_smallest_within_budget():
    from fedpeft.secagg import ddp

    # Prepare
    kw = dict(clip=1.0, scale=64.0, dim=500, delta=1e-5)
    # Execute
    var = ddp.calibrate_variance(target_epsilon=4.0, rounds=10, **kw)
    # Assert
    assert ddp.epsilon(releases=[var] * 10, **kw) <= 4.0 < ddp.epsilon(releases=[var / 1.01] * 10, **kw)


def test_sum_of_site_shares_has_the_stated_variance():
    from fedpeft.secagg import ddp

    # Prepare: 8 sites each add Skellam(v / 7) to 200,000 coordinates (threshold t = 8: t - 1 = 7)
    rng = np.random.default_rng(5)
    v, n, dim = 50.0, 8, 200_000
    # Execute
    total = sum(ddp.skellam(dim, v / (n - 1), rng) for _ in range(n))
    # Assert: integer, mean 0, variance n * v / (n - 1); the sample variance's relative std is sqrt(2 / dim) = 0.3 %
    assert total.dtype == np.int64
    assert abs(total.mean()) < 4 * math.sqrt(n * v / (n - 1) / dim)
    assert total.var() == pytest.approx(n * v / (n - 1), rel=0.015)


def test_private_encoding_is_clipped_unbiased_and_within_the_rounding_bound():
    from fedpeft.secagg import ddp

    # Prepare: a vector of norm 3 clipped to 1, scale 10, no noise
    rng = np.random.default_rng(6)
    x = rng.normal(size=400)
    x *= 3.0 / np.linalg.norm(x)
    # Execute
    draws = np.stack([ddp.encode_private(x, clip=1.0, scale=10.0, local_variance=0.0, rng=rng) for _ in range(2000)])
    # Assert: each draw within the bound; the mean is the clipped, scaled vector (rounding is unbiased)
    bound = ddp.rounded_l2(10.0, 400)
    assert (np.linalg.norm(draws, axis=1) <= bound).all()
    np.testing.assert_allclose(draws.mean(axis=0), x / 3.0 * 10.0, atol=5 * 0.5 / math.sqrt(2000))


def test_shamir_hand_computed_and_any_threshold_subset_rebuilds():
    # Prepare: f(x) = 5 + 3x (threshold 2): shares (1, 8), (2, 11), (3, 14)
    secret = (5).to_bytes(32, "big")
    shares = shamir.split_with([5, 3], 3)
    # Execute / Assert: the shares are f(1..3); any two rebuild 5; with random coefficients, any 7 of 12
    # rebuild a seed and 6 do not (a random field element: refused, or a wrong seed)
    assert [int.from_bytes(s[2:], "big") for s in shares] == [8, 11, 14]
    assert shamir.combine(shares[1:]) == shamir.combine(shares[::2]) == secret
    rng = np.random.default_rng(9)
    seed = bytes(rng.integers(0, 256, 32, dtype=np.uint8))
    many = shamir.split(seed, 7, 12)
    for _ in range(5):
        pick = rng.choice(12, size=7, replace=False)
        assert shamir.combine([many[i] for i in pick]) == seed
    try:
        six = shamir.combine(many[:6])
    except ValueError:
        six = None
    assert six != seed
    assert shamir.P == 2**256 + 297 and pow(3, shamir.P - 1, shamir.P) == 1  # Fermat witness of the prime


def test_roster_file_from_the_sites_public_keys_verifies_their_adverts(tmp_path):
    from fedpeft.secagg import site as secagg_site

    # Prepare: two sites' public ledger keys, collected out of band; one stray file
    keys, _ = _federation(2)
    (tmp_path / "keys").mkdir()
    for i, k in keys.items():
        (tmp_path / "keys" / f"site-{i}.pub").write_text(public_pem(k))
    (tmp_path / "keys" / "notes.txt").write_text("not a key")
    # Execute
    secagg_site.write_roster(tmp_path / "keys", tmp_path / "roster.json")
    roster = secagg_site.load_roster(tmp_path / "roster.json")
    ads = [sa.advertise(sa.SiteSecrets.generate(i, ROUND), keys[i]) for i in range(2)]
    # Assert: both adverts verify against the file; a missing or empty keys folder is refused by name
    assert sorted(sa.verify_adverts(ads, roster=roster, server_round=ROUND)) == [0, 1]
    with pytest.raises(sa.SecAggError, match="no site-<id>.pub files"):
        secagg_site.write_roster(tmp_path / "empty", tmp_path / "r2.json")
    with pytest.raises(sa.SecAggError, match="cannot read the roster"):
        secagg_site.load_roster(tmp_path / "missing.json")


@pytest.mark.parametrize("extra, needle", [
    ({"merge": "median"}, "merge='median' robust='none' cannot run"),
    ({"lora-ranks": "2,4", "merge": "svd"}, "merge='svd'"),
    ({"lora-ranks": "2,4", "merge": "frozen_a", "client-dp": True}, "client-dp=true with merge='frozen_a'"),
    ({"delta-format": "int8"}, "delta-format='int8'"),
    ({"strategy": "fedadam"}, "strategy='fedadam'"),
    ({"secagg-threshold": 0.4}, "secagg-threshold=0.4"),
])
def test_what_needs_individual_updates_is_refused_under_secure_aggregation(extra, needle):
    from fedpeft.runconfig import ConfigError, from_run_config

    with pytest.raises(ConfigError, match=re.escape(needle)):
        from_run_config({"secure-aggregation": True, **extra})


def test_a_site_refuses_a_threshold_below_its_own_floor(tmp_path):
    from fedpeft.privacy.vault import SiteVault
    from fedpeft.secagg import site as secagg_site

    # Prepare: 6 sites' adverts; site 0's own floor at fraction 0.6 is ceil(3.6) = 4
    vaults = {i: SiteVault(tmp_path / f"site-{i}", i) for i in range(6)}
    ads = [secagg_site.advertise_keys(v, ROUND) for v in vaults.values()]
    roster = {i: v.public_key() for i, v in vaults.items()}
    # Execute / Assert: a coordinator asking for 2 is refused; 4 is accepted
    with pytest.raises(sa.SecAggError, match="threshold=2 for 6 sites is below this site's floor of 4"):
        secagg_site.share_keys(vaults[0], ROUND, ads, roster, 2, fraction=0.6)
    assert len(secagg_site.share_keys(vaults[0], ROUND, ads, roster, 4, fraction=0.6)) == 6


def test_a_deployed_site_without_a_roster_refuses_to_share_keys(tmp_path):
    from flwr.app import Context, RecordDict

    from clients.client_app import _roster
    from fedpeft.runconfig import from_run_config

    # Prepare: a deployed site (no partition-id) whose config names no roster, and a virtual one
    cfg = from_run_config({"secure-aggregation": True, "out-dir": str(tmp_path)})
    deployed = Context(run_id=0, node_id=1, node_config={"site-id": 0}, state=RecordDict(), run_config={})
    virtual = Context(run_id=0, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    # Execute / Assert: the deployed site names what it lacks; the virtual one reads its peers' ledgers
    with pytest.raises(SecAggError, match=r"no roster of its peers' ledger keys \(\[secagg\] roster"):
        _roster(deployed, cfg, [0, 1])
    assert _roster(virtual, cfg, [0, 1]) == {}  # no ledgers yet under out-dir: nobody on the roster


def test_a_site_shares_its_keys_once_per_round(tmp_path):
    """A share key encrypts one message under a fixed nonce, so a coordinator that asks stage 2 twice
    for one round (two share sets under one key and nonce would leak their XOR) is refused; a round
    asked again starts from fresh keys."""
    from fedpeft.privacy.vault import SiteVault
    from fedpeft.secagg import site as secagg_site

    # Prepare: two sites' vaults, their adverts, their roster
    vaults = {i: SiteVault(tmp_path / f"site-{i}", i) for i in range(2)}
    adverts = [secagg_site.advertise_keys(vaults[i], ROUND) for i in range(2)]
    roster = {i: vaults[i].public_key() for i in range(2)}
    # Execute: stage 2 once, then again
    first = secagg_site.share_keys(vaults[0], ROUND, adverts, roster, 2)
    # Assert
    assert sorted(first) == [0, 1]
    with pytest.raises(sa.SecAggError, match="site 0: round 3's keys were already shared"):
        secagg_site.share_keys(vaults[0], ROUND, adverts, roster, 2)
    again = secagg_site.advertise_keys(vaults[0], ROUND)  # fresh keys: stage 2 works again
    assert sorted(secagg_site.share_keys(vaults[0], ROUND, [again, adverts[1]], roster, 2)) == [0, 1]
