"""Secure aggregation (Bonawitz et al., CCS 2017) as pure functions over immutable messages.

Stages of one round, n sites, threshold t:
1. ``advertise``: each site makes two fresh X25519 keys (masks; share encryption) and a self-mask
   seed, and signs the keys' public halves and a SHA-256 commitment to the seed, with the round,
   using its ledger's Ed25519 key.
2. ``verify_adverts`` + ``make_shares``: each site checks every advert against its *roster* of the
   federation's ledger keys (the trust root: the coordinator relays the adverts but cannot forge or
   swap them), then Shamir-shares its self-mask seed and its mask key t-of-n, each share encrypted
   to its peer (AES-GCM under an X25519 agreement) so the coordinator only routes ciphertexts.
3. ``mask``: each site adds to its fixed-point update its self mask and the pairwise masks it shares
   with every peer that took part in stage 2 (+ towards higher ids, - towards lower ones).
4. ``reveal`` + ``unmask``: for each peer, a survivor reveals either its share of the self-mask seed
   (the peer sent a masked vector) or of the mask key (it dropped), never both. With t shares the
   coordinator removes the survivors' self masks and the dropped sites' pairwise masks; the
   pairwise masks between survivors cancel. It learns the sum and nothing else. Every rebuilt
   secret is checked against the signed advert (the seed against its commitment, the mask key
   against its public half), so altered or too few shares fail, named, instead of unmasking to noise.

Shamir sharing is ``fedpeft.secagg.shamir`` (a prime field; Flower's helper is ~100x slower);
everything else is ``cryptography``. Written here because Flower's SecAgg+
runs only on its legacy API, relays public keys unsigned and seeds masks with 32 bits.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.privacy.ledger import LedgerError, canonical, load_public_pem
from fedpeft.secagg import ring
from fedpeft.secagg.shamir import SHARE_BYTES
from fedpeft.secagg.shamir import combine as combine_shares
from fedpeft.secagg.shamir import split as create_shares

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecAggError(RuntimeError):
    """A secure-aggregation check failed; the message names the site and what failed."""


def _raw_pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*RAW)


def _raw_priv(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _kdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


@dataclass(frozen=True)
class KeyAdvert:
    """Stage 1: a site's two public keys for one round, signed with its ledger key."""

    site: int
    server_round: int
    mask_pub: bytes
    share_pub: bytes
    signature: bytes = b""
    seed_commit: bytes = b""  # SHA-256 of the self-mask seed (``seed_commitment``); absent in older runs
    range_pub: bytes = b""  # the range stage's key (``fedpeft.secagg.span``); absent in older runs

    def body(self) -> bytes:
        d = {"kind": "secagg-keys", "site": self.site, "round": self.server_round,
             "mask_pub": self.mask_pub.hex(), "share_pub": self.share_pub.hex()}
        if self.seed_commit:  # older runs' adverts (kept as evidence) signed the body without it
            d["seed_commit"] = self.seed_commit.hex()
        if self.range_pub:
            d["range_pub"] = self.range_pub.hex()
        return canonical(d)

    def to_json(self) -> str:
        d = {"site": self.site, "round": self.server_round, "mask_pub": self.mask_pub.hex(),
             "share_pub": self.share_pub.hex(), "sig": self.signature.hex()}
        if self.seed_commit:
            d["seed_commit"] = self.seed_commit.hex()
        if self.range_pub:
            d["range_pub"] = self.range_pub.hex()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KeyAdvert:
        try:
            d = json.loads(text)
            return cls(int(d["site"]), int(d["round"]), bytes.fromhex(d["mask_pub"]), bytes.fromhex(d["share_pub"]),
                       bytes.fromhex(d["sig"]), bytes.fromhex(d.get("seed_commit", "")),
                       bytes.fromhex(d.get("range_pub", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise SecAggError(f"key advert: malformed ({e})") from None


@dataclass(frozen=True)
class SiteSecrets:
    """A site's secrets for one round: they never leave it (kept in its own folder between stages)."""

    site: int
    server_round: int
    mask_key: X25519PrivateKey
    share_key: X25519PrivateKey
    self_seed: bytes
    range_key: X25519PrivateKey  # masks the range stage's [bound, weight]; never secret-shared

    @classmethod
    def generate(cls, site: int, server_round: int) -> SiteSecrets:
        return cls(site, server_round, X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32),
                   X25519PrivateKey.generate())

    def to_json(self) -> str:
        return json.dumps({"site": self.site, "round": self.server_round, "mask": _raw_priv(self.mask_key).hex(),
                           "share": _raw_priv(self.share_key).hex(), "seed": self.self_seed.hex(),
                           "range": _raw_priv(self.range_key).hex()})

    @classmethod
    def from_json(cls, text: str) -> SiteSecrets:
        d = json.loads(text)
        key = X25519PrivateKey.from_private_bytes
        return cls(int(d["site"]), int(d["round"]), key(bytes.fromhex(d["mask"])), key(bytes.fromhex(d["share"])),
                   bytes.fromhex(d["seed"]), key(bytes.fromhex(d["range"])))


def seed_commitment(site: int, server_round: int, seed: bytes) -> bytes:
    """What an advert signs of the self-mask seed: SHA-256 over a domain tag, the round, the site and
    the seed (a 32-byte random seed: the hash hides it)."""
    h = hashes.Hash(hashes.SHA256())
    h.update(f"fedpeft-secagg-seed|{server_round}|{site}|".encode() + seed)
    return h.finalize()


def advertise(secrets: SiteSecrets, signer: Ed25519PrivateKey) -> KeyAdvert:
    """Stage 1: the signed advert of this round's public keys and seed commitment."""
    ad = KeyAdvert(secrets.site, secrets.server_round, _raw_pub(secrets.mask_key), _raw_pub(secrets.share_key),
                   seed_commit=seed_commitment(secrets.site, secrets.server_round, secrets.self_seed),
                   range_pub=_raw_pub(secrets.range_key))
    return KeyAdvert(ad.site, ad.server_round, ad.mask_pub, ad.share_pub, signer.sign(ad.body()), ad.seed_commit,
                     ad.range_pub)


def verify_adverts(adverts: Sequence[KeyAdvert], *, roster: Mapping[int, str], server_round: int
                   ) -> dict[int, KeyAdvert]:
    """Stage 2, first: every advert is for this round, from a site on the roster, signed by that
    site's ledger key, once. A coordinator that swapped a key fails here, named."""
    out: dict[int, KeyAdvert] = {}
    for ad in adverts:
        if ad.site in out:
            raise SecAggError(f"site {ad.site}: two key adverts in round {server_round}")
        if ad.server_round != server_round:
            raise SecAggError(f"site {ad.site}: key advert for round {ad.server_round}, this is round {server_round}")
        pem = roster.get(ad.site)
        if pem is None:
            raise SecAggError(f"site {ad.site}: not on the roster of ledger keys; its advert is refused")
        try:
            load_public_pem(pem).verify(ad.signature, ad.body())
        except (InvalidSignature, LedgerError) as e:
            raise SecAggError(f"site {ad.site}: key advert signature does not verify against its roster key "
                              f"({type(e).__name__}): the coordinator may have swapped its keys") from None
        out[ad.site] = ad
    return out


def threshold_for(n: int, fraction: float, minimum: int) -> int:
    """Shares needed to unmask: ceil(fraction * n), at least ``minimum`` and 2, at most n."""
    return min(n, max(2, minimum, math.ceil(fraction * n - 1e-9)))


_NONCE = b"\0" * 12  # each share key encrypts one message (one round, one direction): no nonce to send


def _share_key(secrets: SiteSecrets, peer: KeyAdvert, src: int, dst: int) -> bytes:
    shared = secrets.share_key.exchange(X25519PublicKey.from_public_bytes(peer.share_pub))
    return _kdf(shared, f"fedpeft-secagg-share|{secrets.server_round}|{src}->{dst}")


def _aad(server_round: int, src: int, dst: int) -> bytes:
    return f"fedpeft-secagg|{server_round}|{src}->{dst}".encode()


def make_shares(secrets: SiteSecrets, adverts: Mapping[int, KeyAdvert], *, threshold: int) -> dict[int, bytes]:
    """Stage 2: Shamir shares (t of n) of this site's self-mask seed and mask key, one ciphertext
    per participant (itself included), for the coordinator to route."""
    peers = sorted(adverts)
    if secrets.site not in adverts:
        raise SecAggError(f"site {secrets.site}: its own advert is missing from the round's key list")
    if not 2 <= threshold <= len(peers):
        raise SecAggError(f"secagg threshold={threshold}: must be in [2, {len(peers)} participants]")
    b_shares = create_shares(secrets.self_seed, threshold, len(peers))
    s_shares = create_shares(_raw_priv(secrets.mask_key), threshold, len(peers))
    out = {}
    for j, b, s in zip(peers, b_shares, s_shares):
        plain = b + s  # raw, fixed-size: the seed's share, then the key's (hex-in-JSON was 2.1x the bytes)
        key = _share_key(secrets, adverts[j], secrets.site, j)
        out[j] = AESGCM(key).encrypt(_NONCE, plain, _aad(secrets.server_round, secrets.site, j))
    return out


def _pair_seed(own: X25519PrivateKey, peer_pub: bytes, server_round: int, a: int, b: int, *,
               domain: str = "mask") -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    return _kdf(shared, f"fedpeft-secagg-{domain}|{server_round}|{min(a, b)}|{max(a, b)}")


def pairwise_masked(own: X25519PrivateKey, site: int, server_round: int, x: np.ndarray, peers: Mapping[int, bytes],
                    *, domain: str) -> np.ndarray:
    """``x`` plus the pairwise masks agreed with each peer's public key (+ towards higher ids, - towards
    lower ones): they cancel in the sum over every site of ``peers``, and only there."""
    y = x
    for j in sorted(set(peers) - {site}):
        m = ring.prg(_pair_seed(own, peers[j], server_round, site, j, domain=domain), x.size)
        y = ring.add(y, m) if site < j else ring.sub(y, m)
    return y


def mask(secrets: SiteSecrets, x: np.ndarray, adverts: Mapping[int, KeyAdvert], participants: Sequence[int]
         ) -> np.ndarray:
    """Stage 3: ``x`` (ring elements) + self mask + pairwise masks with every other participant of
    stage 2 (the ones that received this site's shares)."""
    y = ring.add(x, ring.prg(secrets.self_seed, x.size))
    return pairwise_masked(secrets.mask_key, secrets.site, secrets.server_round, y,
                           {j: adverts[j].mask_pub for j in participants}, domain="mask")


def reveal(secrets: SiteSecrets, adverts: Mapping[int, KeyAdvert], received: Mapping[int, bytes], *,
           survivors: Sequence[int], dropped: Sequence[int], threshold: int) -> dict[int, tuple[str, bytes]]:
    """Stage 4: for each survivor its self-seed share ('b'), for each dropped site its mask-key
    share ('s'). Refuses a request that could unmask one site: a site on both lists, or fewer
    survivors than the threshold."""
    alive, gone = set(survivors), set(dropped)
    if alive & gone:
        raise SecAggError(f"site {secrets.site}: sites {sorted(alive & gone)} are listed as both survived and "
                          "dropped; revealing both shares would unmask them")
    if len(alive) < threshold:
        raise SecAggError(f"site {secrets.site}: {len(alive)} survivors is below the threshold of {threshold}; "
                          "no shares are revealed")
    out: dict[int, tuple[str, bytes]] = {}
    for j in sorted(alive | gone):
        ct = received.get(j)
        if ct is None or j not in adverts:
            continue  # this peer's shares never reached us: others reveal theirs
        try:
            plain = AESGCM(_share_key(secrets, adverts[j], j, secrets.site)).decrypt(
                _NONCE, ct, _aad(secrets.server_round, j, secrets.site))
        except InvalidTag:
            raise SecAggError(f"site {secrets.site}: the share from site {j} does not decrypt (altered, or not "
                              "for this site and round)") from None
        if len(plain) != 2 * SHARE_BYTES:
            raise SecAggError(f"site {secrets.site}: the share from site {j} holds {len(plain)} bytes, not "
                              f"{2 * SHARE_BYTES}")
        out[j] = ("b", plain[:SHARE_BYTES]) if j in alive else ("s", plain[SHARE_BYTES:])
    return out


def reconstruct(reveals: Mapping[int, Mapping[int, tuple[str, bytes]]], *, survivors: Sequence[int],
                dropped: Sequence[int], threshold: int, server_round: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """From t reveals: the survivors' self-mask seeds and the dropped sites' mask keys (raw)."""
    if len(reveals) < threshold:
        raise SecAggError(f"round {server_round}: {len(reveals)} reveals; the threshold is {threshold}: the round "
                          "cannot be unmasked (it is skipped, not merged)")

    def secret_of(j: int, kind: str) -> bytes:
        shares = [r[j][1] for r in reveals.values() if j in r and r[j][0] == kind]
        if len(shares) < threshold:
            raise SecAggError(f"round {server_round}: {len(shares)} shares of site {j}'s "
                              f"{'self-mask seed' if kind == 'b' else 'mask key'}; {threshold} are needed")
        try:
            return combine_shares(shares[:threshold])
        except ValueError:
            raise SecAggError(f"round {server_round}: site {j}'s shares do not combine") from None

    return {j: secret_of(j, "b") for j in survivors}, {j: secret_of(j, "s") for j in dropped}


def unmask_with(masked: Mapping[int, np.ndarray], adverts: Mapping[int, KeyAdvert], seeds: Mapping[int, bytes],
                keys: Mapping[int, bytes], *, server_round: int) -> np.ndarray:
    """The sum of ``masked`` with the survivors' self masks (``seeds``) and the dropped sites' pairwise
    masks (their mask ``keys``, each checked against its signed advert) removed."""
    alive = sorted(masked)
    total = np.zeros_like(masked[alive[0]])
    for i in alive:
        total = ring.add(total, masked[i])
    for j in alive:
        commit = adverts[j].seed_commit
        if commit and seed_commitment(j, server_round, seeds[j]) != commit:
            raise SecAggError(f"round {server_round}: the reconstructed self-mask seed of site {j} does not match "
                              "its signed advert (altered shares)")
        total = ring.sub(total, ring.prg(seeds[j], total.size))
    for j, raw in sorted(keys.items()):
        key = X25519PrivateKey.from_private_bytes(raw)
        if _raw_pub(key) != adverts[j].mask_pub:
            raise SecAggError(f"round {server_round}: the reconstructed mask key of site {j} does not match its "
                              "signed advert")
        for k in alive:  # k added +m towards higher ids, -m towards lower ones
            m = ring.prg(_pair_seed(key, adverts[k].mask_pub, server_round, j, k), total.size)
            total = ring.sub(total, m) if k < j else ring.add(total, m)
    return total


def unmask(masked: Mapping[int, np.ndarray], adverts: Mapping[int, KeyAdvert],
           reveals: Mapping[int, Mapping[int, tuple[str, bytes]]], *, participants: Sequence[int], threshold: int,
           server_round: int) -> np.ndarray:
    """The coordinator's stage 4: the sum of the survivors' vectors (ring elements), masks removed.
    ``masked``: survivor -> its masked vector; ``reveals``: revealing site -> its ``reveal``."""
    alive = sorted(masked)
    if len(alive) < threshold:
        raise SecAggError(f"round {server_round}: {len(alive)} masked vectors; the threshold is {threshold}: the "
                          "round cannot be unmasked (it is skipped, not merged)")
    seeds, keys = reconstruct(reveals, survivors=alive, dropped=sorted(set(participants) - set(alive)),
                              threshold=threshold, server_round=server_round)
    return unmask_with(masked, adverts, seeds, keys, server_round=server_round)
