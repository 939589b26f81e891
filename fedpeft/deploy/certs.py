"""``fedpeft certs``: a private CA, the coordinator's TLS certificate and one node-authentication
key pair per site, with ``cryptography``.

Two kinds of site key, on purpose: Flower's SuperNode authentication needs an EC key on a NIST
curve in OpenSSH format (``site-<id>/auth``, P-384); the privacy ledger signs with Ed25519 keys the
site makes itself in its ``state-dir`` and that never leave it. Losing one does not compromise
the other.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.io import atomic_write_bytes

VALID_DAYS = 365


@dataclass
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[int, tuple[Path, Path]]  # site -> (private key, public key)


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; refusing to overwrite a key or certificate "
                              "(pass --force to replace it)")
    old = os.umask(0o077 if private else 0o022)
    try:
        atomic_write_bytes(path, data)
    finally:
        os.umask(old)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def make_certs(out: str | Path, *, sans: list[str], sites: int, force: bool = False) -> CertPaths:
    """CA, server certificate (``sans``: host names and IPs clients will dial) and ``sites`` node
    authentication key pairs under ``out``; private keys 0600; existing files are never
    overwritten unless ``force``."""
    if not sans:
        raise ValueError("sans=[]: give at least one host name or IP the sites will connect to")
    if sites < 1:
        raise ValueError(f"sites={sites!r}: must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
                .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                # the coordinator's own tools dial its SuperLink on loopback, so loopback is always named
                .add_extension(_san(list(dict.fromkeys([*sans, "127.0.0.1", "localhost"]))), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key", {})
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    existing += [out / f"site-{s}" / "auth" for s in range(sites) if (out / f"site-{s}" / "auth").exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]}: already exists; refusing to overwrite keys or certificates "
                              "(pass --force to replace them)")
    _write(paths.ca_key, _pem_key(ca_key), private=True, force=force)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    _write(paths.server_key, _pem_key(srv_key), private=True, force=force)
    _write(paths.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    for s in range(sites):
        key = ec.generate_private_key(ec.SECP384R1())
        priv = out / f"site-{s}" / "auth"
        pub = out / f"site-{s}" / "auth.pub"
        _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True, force=force)
        _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n",
               private=False, force=force)
        paths.site_keys[s] = (priv, pub)
    return paths
