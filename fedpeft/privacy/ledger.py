"""The privacy ledger: one signed, hash-chained JSON line per DP release, per site.

Written by hand because no library keeps a per-site, third-party-verifiable record of DP releases
(Opacus and Flower keep accountant state in memory only). Design:

- one JSON Lines file per site; line 1 is an ``open`` entry carrying the site's Ed25519 public key;
- every entry holds ``prev`` = SHA-256 of the previous line's bytes and ``seq`` = its line index,
  and ``sig`` = the site's Ed25519 signature over the entry's canonical JSON without ``sig``;
- an append rewrites the file through a temp file and a rename (``fedpeft.io``), so a crash
  leaves the old ledger or the new one; a file not ending in a newline (a torn last line, e.g.
  from a copy cut short) is reported, never silently accepted.

The site keeps its private key; the server keeps copies of the public key and the ledger (each
entry travels in the site's reply and is verified before the server appends it to its copy).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpeft.io import atomic_write_bytes

GENESIS = "0" * 64
VERSION = 1
KINDS = ("open", "dp-sgd", "declined", "client-dp", "no-dp", "secagg-vector")


class LedgerError(ValueError):
    """A ledger does not verify; the message names the site and the entry (line)."""


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def delta_hash(delta: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of an adapter delta (keys sorted; name, dtype, shape and raw bytes), computed the same
    way by the site that signs it and the server that merges it."""
    h = hashlib.sha256()
    for k in sorted(delta):
        t = delta[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- keys --------------------------------------------------------------------------------------

def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(pem: str) -> str:
    """``SHA256:<hex>`` of a public key's DER SubjectPublicKeyInfo: what a site prints
    (``fedpeft site CONFIG --fingerprint``) and the audit lists, to be compared out of band."""
    der = load_public_pem(pem).public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> Path:
    """PEM (PKCS8, unencrypted) with 0600 permissions, written atomically; never overwrites."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: a key is already there; refusing to overwrite it")
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        atomic_write_bytes(path, data)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path}: not an Ed25519 private key")
    return key


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    if path.exists():
        return load_private_key(path)
    key = new_key()
    save_private_key(key, path)
    return key


def load_public_pem(text: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(text.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError("public key is not Ed25519")
    return key


# ---- entries -----------------------------------------------------------------------------------

def sign_entry(body: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The signed JSON line (with trailing newline) for ``body``."""
    if "sig" in body:
        raise ValueError("entry body must not contain 'sig'")
    sig = base64.b64encode(key.sign(canonical(body))).decode()
    return canonical({**body, "sig": sig}) + b"\n"


@dataclass
class Verified:
    """A ledger that verified: its entries (without signatures) and the hash of its last line."""

    site: int
    entries: list[dict[str, Any]]
    head: str
    public_key_pem: str


def parse_lines(data: bytes, *, site: int | str) -> list[bytes]:
    if not data:
        raise LedgerError(f"site {site}: ledger is empty")
    if not data.endswith(b"\n"):
        n = data.count(b"\n") + 1
        raise LedgerError(f"site {site}: entry {n - 1} (line {n}) is torn: the file does not end with a "
                          "newline (an interrupted write or a truncated copy)")
    return data.split(b"\n")[:-1]


def verify_lines(lines: list[bytes], *, site: int | str, trusted_pem: str | None = None) -> Verified:
    """Check every line: JSON, ``seq``, the hash chain, the signature; entry i is line i+1.

    ``trusted_pem``: the site's public key as registered elsewhere; the ``open`` entry must carry
    exactly it (else a forger could re-sign a rewritten ledger with a key of their own).
    """
    entries: list[dict[str, Any]] = []
    prev = GENESIS
    pub: Ed25519PublicKey | None = None
    pem = ""
    for i, raw in enumerate(lines):
        where = f"site {site}: entry {i} (line {i + 1})"
        try:
            entry = json.loads(raw)
        except ValueError:
            raise LedgerError(f"{where}: not valid JSON (torn or edited)") from None
        if not isinstance(entry, dict) or "sig" not in entry:
            raise LedgerError(f"{where}: not a signed entry")
        sig = entry.pop("sig")
        if entry.get("seq") != i:
            raise LedgerError(f"{where}: seq={entry.get('seq')!r}, expected {i} (an entry was deleted, "
                              "inserted or reordered)")
        if entry.get("prev") != prev:
            raise LedgerError(f"{where}: prev hash does not match entry {i - 1} (the chain is broken: an "
                              "entry was edited, deleted or reordered)")
        if i == 0:
            if entry.get("kind") != "open" or "public_key" not in entry:
                raise LedgerError(f"{where}: the first entry must be kind='open' with the site's public key")
            pem = str(entry["public_key"])
            if trusted_pem is not None and pem.strip() != trusted_pem.strip():
                raise LedgerError(f"{where}: the ledger's key is not the site's registered public key "
                                  "(wrong key)")
            try:
                pub = load_public_pem(pem)
            except Exception as e:
                raise LedgerError(f"{where}: unreadable public key ({e})") from None
        elif entry.get("kind") not in KINDS:
            raise LedgerError(f"{where}: kind={entry.get('kind')!r} is not one of {KINDS}")
        if entry.get("site") != site and str(entry.get("site")) != str(site):
            raise LedgerError(f"{where}: site={entry.get('site')!r} in a ledger of site {site}")
        assert pub is not None
        try:
            pub.verify(base64.b64decode(sig), canonical(entry))
        except (InvalidSignature, ValueError):
            raise LedgerError(f"{where}: signature does not verify (the entry was edited or signed "
                              "with another key)") from None
        entries.append(entry)
        prev = line_hash(raw)
    return Verified(site=int(site) if str(site).isdigit() else -1, entries=entries, head=prev,
                    public_key_pem=pem)


def verify_file(path: str | Path, *, site: int | str, trusted_pem: str | None = None) -> Verified:
    return verify_lines(parse_lines(Path(path).read_bytes(), site=site), site=site, trusted_pem=trusted_pem)


class Ledger:
    """A site's own ledger file, appended only through ``append`` (the site holds the key)."""

    def __init__(self, path: str | Path, key: Ed25519PrivateKey, *, site: int) -> None:
        self.path = Path(path)
        self.key = key
        self.site = site
        if not self.path.exists():
            body = {"v": VERSION, "seq": 0, "prev": GENESIS, "kind": "open", "site": site,
                    "public_key": public_pem(key), "time": time.time()}
            atomic_write_bytes(self.path, sign_entry(body, key))
        verified = verify_file(self.path, site=site, trusted_pem=public_pem(key))
        self._seq = len(verified.entries)
        self._head = verified.head

    def append(self, kind: str, fields: Mapping[str, Any]) -> bytes:
        """Sign and append one entry atomically; return its line (what the reply carries)."""
        if kind not in KINDS or kind == "open":
            raise ValueError(f"kind={kind!r}: must be one of {KINDS[1:]}")
        body = {**dict(fields), "v": VERSION, "seq": self._seq, "prev": self._head, "kind": kind,
                "site": self.site, "time": time.time()}
        line = sign_entry(body, self.key)
        atomic_write_bytes(self.path, self.path.read_bytes() + line)
        self._seq += 1
        self._head = line_hash(line)
        return line

    def lines(self) -> list[bytes]:
        return [ln + b"\n" for ln in parse_lines(self.path.read_bytes(), site=self.site)]


def update_copy(path: str | Path, data: bytes, *, site: int, trusted_pem: str) -> int:
    """Server side: replace its copy of a site's ledger with ``data`` (the site's whole ledger, sent
    with each reply) once ``data`` verifies against the registered key and extends the copy it has
    (a site cannot rewrite its history); return how many entries were added."""
    path = Path(path)
    current = path.read_bytes() if path.exists() else b""
    verify_lines(parse_lines(data, site=site), site=site, trusted_pem=trusted_pem)
    have = current.count(b"\n")
    if not data.startswith(current):
        raise LedgerError(f"site {site}: the ledger sent does not extend the copy the server holds "
                          f"({have} entries): history was rewritten")
    if data != current:
        atomic_write_bytes(path, data)
    return data.count(b"\n") - have


class ServerCopies:
    """The server's copies of every site's ledger and public key (``DIR/ledger/``).

    A site's key is registered on its first reply (trust on first use; a deployment can place the
    ``site-<id>.pub`` files beforehand) and pinned from then on. A reply is accepted only when the
    ledger it carries verifies, extends the copy, and ends with this round's entry: the delta's hash
    for a release, or a decline.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def pub_path(self, site: int) -> Path:
        return self.folder / f"site-{site}.pub"

    def ledger_path(self, site: int) -> Path:
        return self.folder / f"site-{site}.jsonl"

    def accept(self, *, site: int, data: bytes, public_key: str, server_round: int,
               delta_sha256: str | None) -> dict[str, Any]:
        """Verify and store; return the round's entry. Raise ``LedgerError`` naming site and entry."""
        pub = self.pub_path(site)
        trusted = pub.read_text() if pub.exists() else public_key
        lines = parse_lines(data, site=site)
        verified = verify_lines(lines, site=site, trusted_pem=trusted)
        last = verified.entries[-1]
        where = f"site {site}: entry {len(lines) - 1}"
        if last.get("round") != server_round:
            raise LedgerError(f"{where}: round={last.get('round')!r}, expected this round {server_round}")
        if delta_sha256 is None and last.get("kind") != "declined":
            raise LedgerError(f"{where}: kind={last.get('kind')!r}, expected 'declined' for a decline")
        if delta_sha256 is not None and (last.get("kind") != "dp-sgd" or last.get("delta_sha256") != delta_sha256):
            raise LedgerError(f"{where}: the delta received does not match the signed delta_sha256")
        if not pub.exists():
            atomic_write_bytes(pub, trusted.encode())
        update_copy(self.ledger_path(site), data, site=site, trusted_pem=trusted)
        return last

    def sync(self, *, site: int, data: bytes, public_key: str) -> int:
        """Bring the copy up to the site's ledger outside a train reply (e.g. a recovery entry sent
        with an evaluate reply): verified and append-only, no round check."""
        pub = self.pub_path(site)
        trusted = pub.read_text() if pub.exists() else public_key
        added = update_copy(self.ledger_path(site), data, site=site, trusted_pem=trusted)
        if not pub.exists():
            atomic_write_bytes(pub, trusted.encode())
        return added
