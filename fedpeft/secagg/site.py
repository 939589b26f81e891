"""A site's side of secure aggregation, free of Flower types: each stage reads and writes the
round's secrets in the site's own folder (0600, temp file then rename) and signs with its ledger key.

The roster (the trust root for the peers' key adverts) is a file the federation hands every site
out of band: JSON ``{"<site id>": "<Ed25519 public key PEM>"}``, named by the node config's
``secagg-roster``. A simulation plays every party on one machine, so there it reads each peer's
key from that peer's own ledger (``sites/site-K/ledger.jsonl``), a stand-in for the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_np
from safetensors.numpy import save as save_np

from fedpeft.io import atomic_write_bytes
from fedpeft.privacy.ledger import delta_hash
from fedpeft.privacy.vault import LEDGER_FILE, SiteVault
from fedpeft.secagg import ddp, ring, span
from fedpeft.secagg import protocol as sa
from fedpeft.secagg.layout import Layout

MASKED = "secagg-masked"  # the one tensor a secure train reply carries: ring elements as int64


def _update_file(vault: SiteVault, server_round: int) -> Path:
    return vault.folder / f"secagg-r{server_round:06d}-update.safetensors"


def _secrets_file(vault: SiteVault, server_round: int) -> Path:
    return vault.folder / f"secagg-r{server_round:06d}.json"


def _save(vault: SiteVault, server_round: int, state: dict) -> None:
    path = _secrets_file(vault, server_round)
    atomic_write_bytes(path, json.dumps(state).encode())
    os.chmod(path, 0o600)


def _load(vault: SiteVault, server_round: int) -> dict:
    try:
        return dict(json.loads(_secrets_file(vault, server_round).read_text()))
    except (OSError, ValueError) as e:
        raise sa.SecAggError(f"site {vault.site}: no secure-aggregation keys for round {server_round} ({e}); "
                             "it cannot take part in this stage") from None


def load_roster(path: str | Path) -> dict[int, str]:
    """A deployment's roster file: ``{"site id": "PEM"}``."""
    try:
        raw = json.loads(Path(path).read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise sa.SecAggError(f"secagg-roster={str(path)!r}: cannot read the roster ({e})") from None


def write_roster(keys_dir: str | Path, out: str | Path) -> dict[int, str]:
    """The roster file from the sites' public ledger keys (``site-<id>.pub``, collected out of band,
    as for ``fedpeft audit --keys``); every site of the federation gets the same file."""
    import re

    from fedpeft.io import atomic_write_json
    from fedpeft.privacy.ledger import LedgerError, load_public_pem

    roster = {}
    for p in sorted(Path(keys_dir).glob("site-*.pub")):
        m = re.fullmatch(r"site-(\d+)\.pub", p.name)
        if not m:
            continue
        pem = p.read_text()
        try:
            load_public_pem(pem)
        except (LedgerError, ValueError) as e:
            raise sa.SecAggError(f"{p}: not an Ed25519 public key ({e})") from None
        roster[int(m.group(1))] = pem
    if not roster:
        raise sa.SecAggError(f"KEYS={str(keys_dir)!r}: no site-<id>.pub files")
    atomic_write_json(out, {str(k): v for k, v in roster.items()})
    return roster


def simulation_roster(sites_dir: Path, sites: Sequence[int]) -> dict[int, str]:
    """A simulation's roster: each site's key from the open entry of its own ledger (SIMULATION ONLY)."""
    out = {}
    for s in sites:
        try:
            first = (sites_dir / f"site-{s}" / LEDGER_FILE).read_bytes().split(b"\n", 1)[0]
            out[s] = str(json.loads(first)["public_key"])
        except (OSError, ValueError, KeyError):
            continue  # no ledger: not on the roster, its advert is refused
    return out


def advertise_keys(vault: SiteVault, server_round: int) -> str:
    """Stage 1: fresh keys for this round, kept in the site's folder; the signed advert as JSON."""
    for old in vault.folder.glob("secagg-r*"):  # an earlier round's keys and update: that round is over
        if not old.name.startswith(f"secagg-r{server_round:06d}"):
            old.unlink(missing_ok=True)
    secrets = sa.SiteSecrets.generate(vault.site, server_round)
    _save(vault, server_round, {"secrets": secrets.to_json()})
    return sa.advertise(secrets, vault.ledger.key).to_json()


def share_keys(vault: SiteVault, server_round: int, adverts_json: Sequence[str], roster: Mapping[int, str],
               threshold: int, *, fraction: float = 0.5, min_sites: int = 2) -> dict[int, bytes]:
    """Stage 2: check every relayed advert against the roster, keep them, and return this site's
    encrypted shares for each participant. The coordinator's ``threshold`` is refused below
    this site's own floor (``threshold_for`` of the adverts, ``fraction``, ``min_sites``): with a
    lower one, fewer colluding sites could rebuild both of one peer's secrets."""
    state = _load(vault, server_round)
    if "adverts" in state:  # each share key encrypts one message (a fixed nonce): never a second share set
        raise sa.SecAggError(f"site {vault.site}: round {server_round}'s keys were already shared; a round asked "
                             "again starts over from fresh keys (stage 1)")
    secrets = sa.SiteSecrets.from_json(state["secrets"])
    adverts = sa.verify_adverts([sa.KeyAdvert.from_json(a) for a in adverts_json], roster=roster,
                                server_round=server_round)
    floor = sa.threshold_for(len(adverts), max(0.5, fraction), min_sites)
    if threshold < floor:
        raise sa.SecAggError(f"site {vault.site}: threshold={threshold} for {len(adverts)} sites is below this "
                             f"site's floor of {floor}; it shares no keys")
    shares = sa.make_shares(secrets, adverts, threshold=threshold)
    _save(vault, server_round, {**state, "adverts": [a.to_json() for a in adverts.values()], "threshold": threshold})
    return shares


def _round_state(vault: SiteVault, server_round: int
                 ) -> tuple[sa.SiteSecrets, dict[int, sa.KeyAdvert], int, dict]:
    """The round's secrets, verified adverts, threshold, and the whole saved state (one read)."""
    state = _load(vault, server_round)
    if "adverts" not in state:
        raise sa.SecAggError(f"site {vault.site}: round {server_round}'s keys were never shared (stage 2 missed)")
    adverts = {a.site: a for a in (sa.KeyAdvert.from_json(x) for x in state["adverts"])}
    return sa.SiteSecrets.from_json(state["secrets"]), adverts, int(state["threshold"]), state


class Sealer:
    """Stage 3 for one round, what the train reply carries. Without distributed DP: the range vector
    (``span``: ``[max |w * delta|, w]`` under the range masks), while ``[w * delta, w]`` waits in the
    site's folder for the vector stage (``send_vector``), which encodes it at the step the range sum
    gives. With a distributed-DP ``plan`` (whose step is public): ``[x, 1]`` in the 64-bit ring at
    once, x the clipped, scaled, rounded update plus this site's Skellam share
    (``ddp.encode_private``), unweighted (client-level DP bounds one site's whole update);
    ``ledger_fields`` then holds what the site's ledger entry signs. Noise comes from this machine's
    entropy unless ``seed`` (seeded simulations) is given."""

    def __init__(self, vault: SiteVault, server_round: int, participants: Sequence[int], *,
                 plan: ddp.DdpPlan | None = None, seed: int | None = None) -> None:
        self.vault, self.server_round, self.participants = vault, server_round, list(participants)
        self.plan, self.seed = plan, seed
        self.ledger_fields: dict[str, object] = {}

    def __call__(self, delta: Mapping[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
        vault = self.vault
        secrets, adverts, threshold, state = _round_state(vault, self.server_round)
        unknown = sorted(set(self.participants) - set(adverts))
        if unknown or vault.site not in self.participants or len(set(self.participants)) < threshold:
            raise sa.SecAggError(f"site {vault.site}: participants {sorted(self.participants)} are not a threshold "
                                 f"({threshold}) of the sites whose keys it verified (unknown: {unknown})")
        layout = Layout.of(delta)
        if self.plan is None:
            v = layout.pack(delta, weight)
            # every site bounds its own part by 1/n of the wide ring's range, so a fallback sum cannot wrap
            ring.check_headroom(max_abs=float(np.abs(v).max()), sites=len(self.participants))
            atomic_write_bytes(_update_file(vault, self.server_round), save_np({"v": v}))
            os.chmod(_update_file(vault, self.server_round), 0o600)
            pubs = {j: adverts[j].range_pub for j in self.participants}
            if not all(pubs.values()):
                raise sa.SecAggError(f"site {vault.site}: a participant's advert has no range key")
            y = sa.pairwise_masked(secrets.range_key, vault.site, self.server_round, span.range_vector(v), pubs,
                                   domain="range")
            sent = {MASKED: torch.from_numpy(y.view(np.int64).copy())}
            _save(vault, self.server_round, {**state, "participants": sorted(self.participants),
                                             "range_sha256": delta_hash(sent)})
            return sent
        else:
            v = layout.pack(delta, 1.0)
            dim = v.size - 1
            scale = ddp.scale_for(clip=self.plan.clip, dim=dim)
            local = self.plan.local_variance(dim, threshold)
            rng = np.random.default_rng(self.seed if self.seed is not None else int.from_bytes(os.urandom(16), "little"))
            xi = ddp.encode_private(v[:-1], clip=self.plan.clip, scale=scale, local_variance=local, rng=rng)
            x = np.concatenate([xi, np.ones(1, dtype=np.int64)]).view(np.uint64)
            self.ledger_fields = {"ddp": {
                "mechanism": "skellam", "clip": self.plan.clip, "scale": scale, "dim": dim, "local_variance": local,
                "threshold": threshold, "delta": self.plan.delta, "noise": "seeded" if self.seed is not None else "secret",
                "adjacency": "add/remove one whole site (client-level), any t - 1 other sites surviving"}}
        y = sa.mask(secrets, x, adverts, self.participants)
        return {MASKED: torch.from_numpy(y.view(np.int64).copy())}


VECTOR_ENTRY = "secagg-vector"  # the ledger entry that binds a 32-bit round's masked update


def vector_fields(server_round: int, bits: span.Bits, range_sha256: str, vector_sha256: str) -> dict[str, object]:
    """What a site's ledger entry for its vector signs: the round, its ring, the range vector its
    release entry signed, and the SHA-256 of the vector's bytes as sent."""
    return {"round": server_round, **bits.as_dict(), "range_sha256": range_sha256, "vector_sha256": vector_sha256}


def send_vector(vault: SiteVault, server_round: int, bits: span.Bits) -> tuple[bytes, bytes]:
    """Stage 3b: the update kept at stage 3, encoded at the coordinator's step, masked as in stage 3
    (self mask + pairwise masks with every participant), in ``bits.ring_bits``; and the ledger line
    the site appends for it (``vector_fields``: signed and chained, binding it to the range vector
    that this round's release entry signed). Once per round:
    two encodings under one mask would give away their difference, a multiple of the update."""
    secrets, adverts, _, state = _round_state(vault, server_round)
    if "range_sha256" not in state:
        raise sa.SecAggError(f"site {vault.site}: round {server_round} has no trained update to send")
    if state.get("vector_sent"):
        raise sa.SecAggError(f"site {vault.site}: round {server_round}'s update was already sent; it is never "
                             "sent twice under one mask")
    v = load_np(_update_file(vault, server_round).read_bytes())["v"]
    y = sa.mask(secrets, span.encode(v, bits), adverts, state["participants"])
    raw = span.narrow(y) if bits.ring_bits == span.NARROW else y.astype("<u8").tobytes()
    _save(vault, server_round, {**state, "vector_sent": True})  # before the entry: never a second vector
    line = vault.ledger.append(VECTOR_ENTRY, vector_fields(server_round, bits, state["range_sha256"],
                                                           hashlib.sha256(raw).hexdigest()))
    return raw, line


def reveal_shares(vault: SiteVault, server_round: int, inbox: Mapping[int, bytes], survivors: Sequence[int],
                  dropped: Sequence[int]) -> dict[int, tuple[str, bytes]]:
    """Stage 4: this site's shares for the survivors' seeds and the dropped sites' keys, as
    ``{site: ("b" | "s", share)}``; the round's secrets are deleted after."""
    secrets, adverts, threshold, _ = _round_state(vault, server_round)
    got = sa.reveal(secrets, adverts, dict(inbox), survivors=survivors,
                    dropped=dropped, threshold=threshold)
    _secrets_file(vault, server_round).unlink(missing_ok=True)  # one-round keys: nothing to keep
    _update_file(vault, server_round).unlink(missing_ok=True)
    return got
